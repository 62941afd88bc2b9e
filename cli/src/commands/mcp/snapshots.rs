//! Snapshot tools: list_snapshots, create_snapshot, branch_sandbox.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forkd_api::v1::{BranchRequest, CreateSnapshotRequest, GetSnapshotRequest, ListSnapshotsRequest, Snapshot};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::ForkdMcp;
use super::reply::{Answer, Reply, ToolError, unary};
use super::views::snapshot_brief;
use crate::json;

/// How often a snapshot being written is polled.
const POLL_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSnapshotsParams {
    /// Only snapshots with this status: "ready" (can spawn sandboxes), "writing"
    /// (being created), "failed" or "deleting". Omit to list all.
    #[serde(default)]
    pub status: Option<String>,
}

fn default_image() -> String {
    "python".into()
}

fn default_true() -> bool {
    true
}

fn default_wait_secs() -> u32 {
    600
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    /// Tag (name) of the new snapshot: 1-64 of letters, digits, '_', '.' and '-',
    /// starting with a letter, digit or '_' (e.g. "py-numpy"). Must not exist yet.
    pub tag: String,
    /// Image to boot: "python" (a warm Python interpreter, for eval_code),
    /// "minimal", or the absolute path of an image file on the daemon's host.
    #[serde(default = "default_image")]
    pub image: String,
    /// Virtual CPUs of the VM (daemon default: 1).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB (daemon default: 256).
    #[serde(default)]
    pub mem_mib: Option<u32>,
    /// Python code run in the warm interpreter before the snapshot is taken,
    /// e.g. "import numpy"; every sandbox spawned from it starts with its effects.
    #[serde(default)]
    pub warm_eval: Option<String>,
    /// Labels (string keys and values) stored with the snapshot.
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Wait until the snapshot is ready (or failed) before answering. With false,
    /// answer at once with status "writing"; poll list_snapshots.
    #[serde(default = "default_true")]
    pub wait: bool,
    /// Longest wait, in seconds, when `wait` is true. If the snapshot is still
    /// being written by then, the answer has status "writing".
    #[serde(default = "default_wait_secs")]
    pub wait_timeout_secs: u32,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum BranchMode {
    /// Only the memory pages written since the sandbox's snapshot (small, fast).
    #[default]
    Diff,
    /// A flat copy of the whole memory.
    Full,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchParams {
    /// Id of the running sandbox to save, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// Tag of the new snapshot; generated when omitted (see the answer).
    #[serde(default)]
    pub tag: Option<String>,
    /// "diff" (default): only what the sandbox changed, as a layer over its
    /// snapshot; "full": a flat copy.
    #[serde(default)]
    pub mode: BranchMode,
}

fn settled(status: &str) -> bool {
    matches!(status, "ready" | "failed" | "deleting")
}

/// A snapshot that ended "failed" is an error the model should see.
fn snapshot_answer(snap: &Snapshot) -> Reply {
    if snap.status == "failed" {
        let reason = if snap.status_reason.is_empty() { "no reason given" } else { &snap.status_reason };
        return Err(ToolError::new("FAILED_PRECONDITION", format!("snapshot {} failed: {reason}", snap.tag)));
    }
    Ok(Answer(json::snapshot(snap)))
}

#[tool_router(router = snapshot_tools, vis = "pub(super)")]
impl ForkdMcp {
    #[tool(
        description = "List the daemon's snapshots, oldest first. A snapshot is a paused, warm VM; \
            sandboxes are forked from snapshots whose status is \"ready\" (pass its `tag` to \
            spawn_sandboxes). Answers {\"snapshots\": [{tag, status, kind, image, runtime, \
            mem_mib, live_sandboxes, ...}]}; runtime \"python\" means eval_code works in its sandboxes.",
        annotations(read_only_hint = true)
    )]
    async fn list_snapshots(&self, Parameters(p): Parameters<ListSnapshotsParams>) -> Reply {
        let status = p.status.unwrap_or_default();
        let mut all = Vec::new();
        let mut page_token = String::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let req = ListSnapshotsRequest { page_size: 0, page_token, status: status.clone() };
            let resp = unary(&self.conn, self.conn.snapshots().list_snapshots(req)).await?;
            all.extend(resp.snapshots.iter().map(snapshot_brief));
            if resp.next_page_token.is_empty() || !seen.insert(resp.next_page_token.clone()) {
                break;
            }
            page_token = resp.next_page_token;
        }
        Ok(Answer(json!({ "snapshots": all })))
    }

    #[tool(description = "Create a snapshot: boot an image, wait until its runtime is warm (optionally \
            running `warm_eval` Python first), pause it and save it under `tag`. Takes from seconds \
            to a few minutes; by default the call waits until the snapshot is ready (up to \
            `wait_timeout_secs`). Answers the snapshot (status \"ready\", or \"writing\" if still \
            in progress). Then spawn sandboxes from it with spawn_sandboxes.")]
    async fn create_snapshot(&self, Parameters(p): Parameters<CreateSnapshotParams>) -> Reply {
        let req = CreateSnapshotRequest {
            tag: p.tag.clone(),
            image: p.image,
            vcpus: p.vcpus.unwrap_or(0),
            mem_mib: p.mem_mib.unwrap_or(0),
            warm_timeout_secs: 0,
            warm_eval: p.warm_eval.unwrap_or_default(),
            volumes: Vec::new(),
            labels: p.labels,
            // Polled below, so a long boot never holds one call open.
            wait: Some(false),
            ..Default::default()
        };
        let mut snap = unary(&self.conn, self.conn.snapshots().create_snapshot(req)).await?;
        let give_up = Instant::now() + Duration::from_secs(u64::from(p.wait_timeout_secs));
        while p.wait && !settled(&snap.status) && Instant::now() < give_up {
            tokio::time::sleep(POLL_EVERY).await;
            let req = GetSnapshotRequest { tag: snap.tag.clone() };
            snap = unary(&self.conn, self.conn.snapshots().get_snapshot(req)).await?;
        }
        snapshot_answer(&snap)
    }

    #[tool(description = "Save a running sandbox as a new snapshot while it keeps running (it is paused \
            only for the copy, typically milliseconds). Sandboxes spawned from the new snapshot start \
            exactly where this one is: files, memory, running processes. Answers the snapshot; its \
            `tag` goes to spawn_sandboxes.")]
    async fn branch_sandbox(&self, Parameters(p): Parameters<BranchParams>) -> Reply {
        let req = BranchRequest {
            id: p.sandbox_id,
            tag: p.tag.unwrap_or_default(),
            mode: match p.mode {
                BranchMode::Diff => "diff",
                BranchMode::Full => "full",
            }
            .to_string(),
            wait: Some(true),
            ..Default::default()
        };
        let mut snap = unary(&self.conn, self.conn.sandboxes().branch(req)).await?;
        // The daemon answers once the snapshot is ready; an older one may
        // answer while it is still being written.
        let give_up = Instant::now() + Duration::from_secs(u64::from(default_wait_secs()));
        while !settled(&snap.status) && Instant::now() < give_up {
            tokio::time::sleep(POLL_EVERY).await;
            let req = GetSnapshotRequest { tag: snap.tag.clone() };
            snap = unary(&self.conn, self.conn.snapshots().get_snapshot(req)).await?;
        }
        snapshot_answer(&snap)
    }
}
