//! Lifecycle events, fanned out to every watcher.

use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub sandbox_id: String,
    pub workspace: String,
    pub snapshot_tag: String,
    pub reason: String,
    pub at_unix_ms: i64,
    /// The principal the sandbox belongs to: watchers see their own only.
    pub owner: String,
}

pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0 }
    }
}

impl Events {
    /// An event about a sandbox (its record says workspace, snapshot and owner).
    pub fn emit_for(&self, kind: &'static str, rec: &super::store::SandboxRecord, reason: &str) {
        self.emit_ws(kind, rec.id.as_str(), &rec.workspace, rec.snapshot_tag.as_str(), &rec.owner, reason);
    }

    pub fn emit_ws(
        &self,
        kind: &'static str,
        sandbox_id: &str,
        workspace: &str,
        snapshot_tag: &str,
        owner: &str,
        reason: &str,
    ) {
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let _ = self.tx.send(Event {
            kind,
            sandbox_id: sandbox_id.into(),
            workspace: workspace.into(),
            snapshot_tag: snapshot_tag.into(),
            reason: reason.into(),
            at_unix_ms,
            owner: owner.into(),
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
