//! The states of sandboxes and workspaces, and the moves allowed between
//! them. Every change of a live sandbox's state goes through
//! [`Runtime::transition`]: it checks the move, persists the record (so a
//! daemon that dies right after finds the new state) and then emits the
//! event that says so. States are stored by their lower-case names, the
//! same strings the API shows.

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::runtime::Runtime;
use super::sandboxes::Sandbox;
use super::store::SandboxRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Its VMM is being restored; not yet reported to anyone.
    Starting,
    Running,
    /// Being deleted: persisted before the VMM is killed, so a delete the
    /// daemon could not finish is finished by the next start.
    Killing,
    /// Its VMM ended without being asked to (see the reason).
    Exited,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Killing => "killing",
            Self::Exited => "exited",
        }
    }

    /// Whether a VMM is (or may still be) behind it.
    pub fn holds_vmm(self) -> bool {
        matches!(self, Self::Starting | Self::Running)
    }

    /// The moves the lifecycle allows. Killing and Exited are final: the
    /// record is then forgotten or kept for the caller to read and delete.
    pub fn may_become(self, to: SandboxStatus) -> bool {
        use SandboxStatus::*;
        matches!(
            (self, to),
            (Starting, Running) | (Starting, Killing) | (Starting, Exited) | (Running, Killing) | (Running, Exited)
        )
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a workspace's TTL running out does to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpiryAction {
    /// Suspend: the state is kept and the TTL stops running.
    #[default]
    Suspend,
    /// Delete it, state and all.
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceStatus {
    Running,
    /// Its state is a snapshot; no sandbox runs.
    Suspended,
    Failed,
}

impl WorkspaceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Suspended => "suspended",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for WorkspaceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Runtime {
    /// Moves a live sandbox to `to` with `reason`: checks the move,
    /// persists the record, then emits `event` (if any). Returns the new
    /// record, or `None` when the sandbox is already past the point where
    /// `to` applies (another path got there first: only one of them acts).
    pub(crate) fn transition(
        &self,
        sb: &Sandbox,
        to: SandboxStatus,
        reason: impl Into<String>,
        event: Option<&'static str>,
    ) -> Result<Option<SandboxRecord>> {
        let rec = {
            let mut r = sb.record.lock().unwrap_or_else(|p| p.into_inner());
            if !r.status.may_become(to) {
                return Ok(None);
            }
            r.status = to;
            r.status_reason = reason.into();
            r.clone()
        };
        self.store.put_sandbox(&rec)?;
        if let Some(kind) = event {
            self.events.emit_for(kind, &rec, &rec.status_reason);
        }
        Ok(Some(rec))
    }
}

/// FAILED_PRECONDITION for a call that needs a running sandbox.
pub fn not_running(rec: &SandboxRecord) -> Error {
    Error::FailedPrecondition(format!(
        "sandbox {} is {}{}",
        rec.id,
        rec.status,
        if rec.status_reason.is_empty() { String::new() } else { format!(": {}", rec.status_reason) }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_sandboxes_move_and_final_states_stay() {
        use SandboxStatus::*;
        let all = [Starting, Running, Killing, Exited];
        for from in all {
            for to in all {
                let allowed = from.may_become(to);
                match from {
                    Killing | Exited => assert!(!allowed, "{from} → {to}"),
                    Starting => assert_eq!(allowed, to != Starting, "{from} → {to}"),
                    Running => assert_eq!(allowed, matches!(to, Killing | Exited), "{from} → {to}"),
                }
            }
        }
    }

    #[test]
    fn stored_names_are_the_api_names() {
        for (s, name) in [
            (SandboxStatus::Starting, "starting"),
            (SandboxStatus::Running, "running"),
            (SandboxStatus::Killing, "killing"),
            (SandboxStatus::Exited, "exited"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.as_str(), name);
            assert_eq!(serde_json::from_value::<SandboxStatus>(name.into()).unwrap(), s);
        }
        assert_eq!(serde_json::to_value(WorkspaceStatus::Suspended).unwrap(), "suspended");
    }
}
