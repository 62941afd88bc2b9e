//! Lifecycle policy: absolute TTL and idle timeout. On expiry a plain
//! sandbox is killed and a workspace's sandbox is suspended (so the
//! workspace keeps its state and stops spending its TTL). A sandbox whose
//! guest broke its agent channel (flooded it with malformed frames, stopped
//! reading it) is stopped and kept listed as failed, with the reason.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkd_api::names::{SandboxId, WorkspaceName};

use super::runtime::Runtime;
use super::{Error, Result, deadline_unix, now_unix, now_unix_ms};

const TICK: Duration = Duration::from_millis(500);

impl Runtime {
    pub(crate) fn start_lifecycle(self: Arc<Self>) {
        let busy: Arc<Mutex<HashSet<SandboxId>>> = Default::default();
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let Some(rt) = weak.upgrade() else { return };
                for (id, reason) in rt.expired().await {
                    if !busy.lock().unwrap().insert(id.clone()) {
                        continue;
                    }
                    let (rt2, busy2) = (rt.clone(), busy.clone());
                    tokio::spawn(async move {
                        if let Err(e) = rt2.expire(id.as_str(), reason).await {
                            tracing::warn!(%id, "expiring sandbox: {e}");
                        }
                        busy2.lock().unwrap().remove(&id);
                    });
                }
            }
        });
    }

    /// Running sandboxes past their TTL or idle timeout.
    async fn expired(&self) -> Vec<(SandboxId, &'static str)> {
        let (now, now_ms) = (now_unix(), now_unix_ms());
        let map = self.sandboxes.read().await;
        map.values()
            .filter_map(|sb| {
                let r = sb.record.lock().unwrap();
                if r.status != super::state::SandboxStatus::Running {
                    return None;
                }
                if sb.agent.failure().is_some() {
                    return Some((r.id.clone(), "channel"));
                }
                if r.expires_at_unix > 0 && now >= r.expires_at_unix {
                    return Some((r.id.clone(), "ttl"));
                }
                let idle_ms = r.settings.idle_timeout_secs as i64 * 1000;
                if idle_ms > 0 && now_ms - sb.last_active_ms() >= idle_ms {
                    return Some((r.id.clone(), "idle"));
                }
                None
            })
            .collect()
    }

    async fn expire(self: &Arc<Self>, id: &str, why: &'static str) -> Result<()> {
        let sid = SandboxId::parse(id)?;
        let sb = match self.sandbox(&sid).await {
            Ok(sb) => sb,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let rec = sb.snapshot();
        if why == "channel" {
            let broken = sb.agent.failure().unwrap_or_default().to_string();
            let reason = format!("failed: the guest broke its agent channel ({broken}); the VM was stopped");
            // Marked as killing, so the exit watcher does not report the
            // exit as one of its own; recorded once the VMM is gone (its
            // cgroup can only be removed then).
            sb.killing.store(true, std::sync::atomic::Ordering::SeqCst);
            crate::vmm::process::kill(sb.pid, sb.start_time, std::time::Duration::from_secs(5)).await;
            if let Some(rec) = self.vmm_exited(&sb, reason.clone()) {
                self.events.emit_for("failed", &rec, &reason);
                if !rec.workspace.is_empty() {
                    self.workspace_lost_sandbox(&rec.workspace, &reason);
                }
            }
            return Ok(());
        }
        let reason = match why {
            "ttl" => format!("its TTL of {} s ran out", rec.settings.ttl_secs),
            _ => format!("idle for {} s", rec.settings.idle_timeout_secs),
        };
        self.events.emit_for("ttl_expired", &rec, &reason);
        if rec.workspace.is_empty() {
            self.delete_sandboxes(&[sid], None, false).await?;
        } else {
            let name = WorkspaceName::parse(&rec.workspace)?;
            match self.get_workspace(&name).map(|w| w.on_expiry) {
                Ok(super::state::ExpiryAction::Delete) => {
                    self.delete_workspace(&name).await?;
                }
                _ => {
                    self.suspend_workspace(&name).await?;
                }
            }
        }
        Ok(())
    }

    /// Sets a new TTL counted from now (0 = none) and marks the sandbox active.
    pub async fn renew(&self, id: &SandboxId, ttl_secs: u32) -> Result<super::store::SandboxRecord> {
        if ttl_secs > 30 * 24 * 3600 {
            return Err(Error::invalid("ttl_secs", "exceeds 30 days"));
        }
        let sb = self.sandbox(id).await?;
        sb.ensure_running()?;
        let rec = {
            let mut r = sb.record.lock().unwrap();
            r.settings.ttl_secs = ttl_secs;
            r.expires_at_unix = deadline_unix(ttl_secs);
            r.clone()
        };
        sb.touch();
        self.store.put_sandbox(&rec)?;
        Ok(rec)
    }
}
