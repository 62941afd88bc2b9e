//! Workspaces: named, long-lived sandboxes. Suspend captures the running VM
//! into the workspace's state snapshot (only the pages written since its
//! snapshot are copied while it is paused) and stops it; resume forks from
//! that state with the settings the workspace was created with. The source
//! snapshot is never changed; superseded state snapshots are removed.

pub mod locks;

use super::state::WorkspaceStatus;
use std::sync::Arc;

use forkd_api::names::{SandboxId, Tag, WorkspaceName};
use sha2::{Digest, Sha256};

use super::branch::{BranchMode, BranchRequest};
use super::runtime::Runtime;
use super::sandboxes::{CreateSandboxes, workspace_holder};
use super::store::{SandboxSettings, SnapshotStatus, WorkspaceRecord};
use super::{Error, Result, now_unix};

/// The tag of a workspace's n-th state snapshot, always within the tag limit.
pub fn state_tag(name: &WorkspaceName, generation: u64) -> Tag {
    let plain = format!("ws-{}-{generation}", name.as_str());
    let tag = if plain.len() <= forkd_api::names::TAG_MAX {
        plain
    } else {
        let h = hex::encode(Sha256::digest(name.as_str().as_bytes()));
        format!("ws-{}-{generation}", &h[..24])
    };
    Tag::parse(&tag).expect("derived tags are valid")
}

/// What a workspace is created with besides its sandbox settings.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceOptions {
    pub on_expiry: super::state::ExpiryAction,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub env: std::collections::BTreeMap<String, String>,
    /// The source snapshot was made for it (an E2B fork): it goes with the
    /// last workspace that owns it.
    pub owns_source: bool,
}

impl Runtime {
    fn workspace_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.workspace_locks.of(name)
    }

    pub fn get_workspace(&self, name: &WorkspaceName) -> Result<WorkspaceRecord> {
        self.store
            .get_workspace(name.as_str())?
            .ok_or_else(|| Error::NotFound(format!("workspace {:?} not found", name.as_str())))
    }

    pub fn list_workspaces(&self) -> Result<Vec<WorkspaceRecord>> {
        self.store.list_workspaces()
    }

    pub async fn create_workspace(
        self: &Arc<Self>,
        name: WorkspaceName,
        source: Tag,
        settings: SandboxSettings,
        by: super::tenants::Principal,
    ) -> Result<WorkspaceRecord> {
        self.create_workspace_with(name, source, settings, by, WorkspaceOptions::default()).await
    }

    pub async fn create_workspace_with(
        self: &Arc<Self>,
        name: WorkspaceName,
        source: Tag,
        settings: SandboxSettings,
        by: super::tenants::Principal,
        opts: WorkspaceOptions,
    ) -> Result<WorkspaceRecord> {
        settings.validate_lifecycle()?;
        let lock = self.workspace_lock(name.as_str());
        let _g = lock.lock().await;
        let snap = self.get_snapshot(&source)?;
        if snap.status != SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} is {}, not ready",
                snap.tag,
                snap.status.as_str()
            )));
        }
        let now = now_unix();
        let mut rec = WorkspaceRecord {
            name: name.clone(),
            status: WorkspaceStatus::Running,
            status_reason: String::new(),
            live_sandbox_id: String::new(),
            source_snapshot_tag: source.clone(),
            state_tag: String::new(),
            settings: settings.clone(),
            created_at_unix: now,
            updated_at_unix: now,
            suspended_at_unix: 0,
            ttl_used_secs: 0,
            generation: 0,
            owner: by.owner(),
            on_expiry: opts.on_expiry,
            metadata: opts.metadata,
            env: opts.env,
            owns_source: opts.owns_source,
        };
        // The record first: the name is taken before any VM exists.
        self.store.insert_workspace(&rec)?;
        match self.start_workspace_sandbox(&rec, &source, by).await {
            Ok(id) => {
                rec.live_sandbox_id = id;
                self.store.update_workspace(&rec)?;
                Ok(rec)
            }
            Err(e) => {
                let _ = self.store.delete_workspace(name.as_str());
                self.release_rw_volumes(&workspace_holder(name.as_str()));
                Err(e)
            }
        }
    }

    async fn start_workspace_sandbox(
        self: &Arc<Self>,
        rec: &WorkspaceRecord,
        from: &Tag,
        by: super::tenants::Principal,
    ) -> Result<String> {
        let mut settings = rec.settings.clone();
        if settings.ttl_secs > 0 {
            let left = (settings.ttl_secs as u64).saturating_sub(rec.ttl_used_secs).max(1);
            settings.ttl_secs = left as u32;
        }
        let kids = self
            .create_sandboxes(CreateSandboxes {
                tag: from.clone(),
                n: 1,
                settings,
                workspace: rec.name.to_string(),
                prewarm: false,
                by,
                owner: rec.owner.clone(),
            })
            .await?;
        Ok(kids[0].id.to_string())
    }

    pub async fn suspend_workspace(self: &Arc<Self>, name: &WorkspaceName) -> Result<WorkspaceRecord> {
        let lock = self.workspace_lock(name.as_str());
        let _g = lock.lock().await;
        let mut rec = self.get_workspace(name)?;
        if rec.status != WorkspaceStatus::Running || rec.live_sandbox_id.is_empty() {
            return Err(Error::FailedPrecondition(format!("workspace {:?} is {}, not running", rec.name, rec.status)));
        }
        let id = SandboxId::parse(&rec.live_sandbox_id)?;
        let sb = self.sandbox(&id).await?;
        let ran_for = (now_unix() - sb.snapshot().created_at_unix).max(0) as u64;
        let generation = rec.generation + 1;
        let tag = state_tag(name, generation);
        // Flat state: it has no parent, so the previous state can be removed
        // and chains never grow however often a workspace is suspended.
        let snap = self
            .branch(BranchRequest {
                id: id.clone(),
                tag: Some(tag.clone()),
                mode: BranchMode::Full,
                measure_only: false,
                wait: true,
            })
            .await?;
        self.delete_sandboxes(std::slice::from_ref(&id), None, false).await?;
        let old_state = std::mem::replace(&mut rec.state_tag, snap.tag.to_string());
        rec.generation = generation;
        rec.status = WorkspaceStatus::Suspended;
        rec.live_sandbox_id = String::new();
        rec.suspended_at_unix = now_unix();
        rec.updated_at_unix = rec.suspended_at_unix;
        rec.ttl_used_secs += ran_for;
        self.store.update_workspace(&rec)?;
        self.events.emit_ws("suspended", id.as_str(), rec.name.as_str(), snap.tag.as_str(), &rec.owner, "");
        if !old_state.is_empty() {
            self.collect_state(&old_state).await;
        }
        Ok(rec)
    }

    pub async fn resume_workspace(
        self: &Arc<Self>,
        name: &WorkspaceName,
        by: super::tenants::Principal,
    ) -> Result<WorkspaceRecord> {
        let lock = self.workspace_lock(name.as_str());
        let _g = lock.lock().await;
        let mut rec = self.get_workspace(name)?;
        if rec.status == WorkspaceStatus::Running {
            return Err(Error::FailedPrecondition(format!("workspace {:?} is already running", rec.name)));
        }
        let from = if rec.state_tag.is_empty() { rec.source_snapshot_tag.to_string() } else { rec.state_tag.clone() };
        let from = Tag::parse(&from)?;
        let id = self.start_workspace_sandbox(&rec, &from, by).await?;
        rec.live_sandbox_id = id.clone();
        rec.status = WorkspaceStatus::Running;
        rec.status_reason = String::new();
        rec.updated_at_unix = now_unix();
        self.store.update_workspace(&rec)?;
        self.events.emit_ws("resumed", &id, rec.name.as_str(), from.as_str(), &rec.owner, "");
        Ok(rec)
    }

    /// Sets the time left to run to `secs` from now: the live sandbox's
    /// TTL, and the budget a resume starts from.
    pub async fn set_workspace_timeout(&self, name: &WorkspaceName, secs: u32) -> Result<WorkspaceRecord> {
        if secs == 0 || secs > 30 * 24 * 3600 {
            return Err(Error::invalid("timeout", format!("{secs} s is not 1 s–30 days")));
        }
        let lock = self.workspace_lock(name.as_str());
        let _g = lock.lock().await;
        let mut rec = self.get_workspace(name)?;
        let mut used = rec.ttl_used_secs;
        if rec.status == WorkspaceStatus::Running
            && let Ok(id) = SandboxId::parse(&rec.live_sandbox_id)
        {
            let sb = self.renew(&id, secs).await?;
            used += (now_unix() - sb.created_at_unix).max(0) as u64;
        }
        rec.settings.ttl_secs = (used + secs as u64).min(u32::MAX as u64) as u32;
        rec.updated_at_unix = now_unix();
        self.store.update_workspace(&rec)?;
        Ok(rec)
    }

    /// Kills the live sandbox and removes every state snapshot; never the source.
    pub async fn delete_workspace(self: &Arc<Self>, name: &WorkspaceName) -> Result<Vec<String>> {
        let lock = self.workspace_lock(name.as_str());
        let _g = lock.lock().await;
        let rec = self.get_workspace(name)?;
        if let Ok(id) = SandboxId::parse(&rec.live_sandbox_id) {
            self.delete_sandboxes(&[id], None, false).await?;
        }
        let mut deleted = vec![];
        if !rec.state_tag.is_empty() && self.collect_state(&rec.state_tag).await {
            deleted.push(rec.state_tag.clone());
        }
        self.store.delete_workspace(name.as_str())?;
        self.release_rw_volumes(&workspace_holder(name.as_str()));
        self.workspace_locks.forget(name.as_str());
        if rec.owns_source {
            let others = self.store.list_workspaces()?;
            if !others.iter().any(|w| w.source_snapshot_tag == rec.source_snapshot_tag)
                && self.collect_state(rec.source_snapshot_tag.as_str()).await
            {
                deleted.push(rec.source_snapshot_tag.to_string());
            }
        }
        Ok(deleted)
    }

    /// Removes a superseded state snapshot; false when it could not go
    /// (someone forked from it or branched on top of it).
    async fn collect_state(&self, tag: &str) -> bool {
        let Ok(t) = Tag::parse(tag) else { return false };
        match self.delete_snapshot(&t, false, false).await {
            Ok(_) => true,
            Err(Error::NotFound(_)) => true,
            Err(e) => {
                tracing::info!(tag, "keeping workspace state snapshot: {e}");
                false
            }
        }
    }

    /// After a restart: a workspace without a live sandbox keeps the
    /// read-write volumes its state snapshot has mounted.
    pub(crate) fn reclaim_workspace_volumes(&self) -> Result<()> {
        for ws in self.store.list_workspaces()? {
            if ws.status == WorkspaceStatus::Running || ws.state_tag.is_empty() {
                continue;
            }
            let Some(state) = self.store.get_snapshot(&ws.state_tag)? else { continue };
            let rw = super::volumes::read_write_files(&super::volumes::parse_stored(&state.volumes));
            if let Err(e) = self.reserve_rw_volumes(&rw, &workspace_holder(ws.name.as_str()), None) {
                tracing::warn!(workspace = %ws.name, "volumes of a suspended workspace: {e}");
            }
        }
        Ok(())
    }

    /// A workspace's sandbox went away without a suspend (it exited or was
    /// killed directly): the workspace falls back to its last state.
    pub(crate) fn workspace_lost_sandbox(&self, workspace: &str, reason: &str) {
        if let Ok(Some(mut rec)) = self.store.get_workspace(workspace)
            && rec.status == WorkspaceStatus::Running
        {
            rec.status = WorkspaceStatus::Suspended;
            rec.status_reason = format!("its sandbox ended: {reason}; resume starts from the last suspended state");
            rec.live_sandbox_id = String::new();
            rec.updated_at_unix = now_unix();
            let _ = self.store.update_workspace(&rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_tags_fit_the_tag_limit() {
        let short = WorkspaceName::parse("dev").unwrap();
        assert_eq!(state_tag(&short, 3).as_str(), "ws-dev-3");
        let long = WorkspaceName::parse(&"w".repeat(64)).unwrap();
        let t = state_tag(&long, 123456789);
        assert!(t.as_str().len() <= forkd_api::names::TAG_MAX);
        assert_ne!(t, state_tag(&WorkspaceName::parse(&"v".repeat(64)).unwrap(), 123456789));
    }
}
