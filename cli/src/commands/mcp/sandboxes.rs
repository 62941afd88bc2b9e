//! Sandbox tools: spawn_sandboxes, list_sandboxes, get_sandbox, kill_sandbox.

use std::collections::HashMap;

use forkd_api::v1::{CreateSandboxesRequest, DeleteSandboxRequest, GetSandboxRequest, ListSandboxesRequest};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::ForkdMcp;
use super::reply::{Answer, Reply, ToolError, unary};
use super::views::sandbox_brief;
use crate::json;

/// Most sandboxes one call may fork (the API allows 1000; a model asking
/// for more than this is almost certainly mistaken).
const MAX_SPAWN: u32 = 100;

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum Network {
    /// No network device (default).
    None,
    /// Outbound through NAT, only to the `allow` entries.
    Nat,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnParams {
    /// Tag of a ready snapshot to fork from (see list_snapshots), e.g. "py".
    pub snapshot_tag: String,
    /// How many sandboxes to fork, 1-100. All or nothing: if one fails, none is left.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub n: u32,
    /// Kill each sandbox after this many seconds. Recommended, so forgotten
    /// sandboxes go away; default: no limit (the daemon's setting).
    #[serde(default)]
    pub ttl_secs: Option<u32>,
    /// Kill each sandbox after this many seconds without any call to it.
    #[serde(default)]
    pub idle_timeout_secs: Option<u32>,
    /// Memory limit per sandbox in MiB (default: the daemon's, guest RAM + 64 MiB).
    #[serde(default)]
    pub memory_limit_mib: Option<u32>,
    /// CPU quota per sandbox in cores, e.g. 0.5 for half a core (default: no limit).
    #[serde(default)]
    pub cpu_quota: Option<f64>,
    /// Networking: "none" (default, no network) or "nat" (outbound only, to `allow`).
    #[serde(default)]
    pub network: Option<Network>,
    /// With network "nat": egress allowed to these CIDR[:PORT] entries, e.g.
    /// ["10.0.0.0/8:443"]; everything else is refused.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Labels (string keys and values) attached to each sandbox.
    #[serde(default)]
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSandboxesParams {
    /// Only sandboxes forked from this snapshot tag. Omit to list all.
    #[serde(default)]
    pub snapshot_tag: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxParams {
    /// Sandbox id, as returned by spawn_sandboxes: "sb-" and lowercase letters
    /// and digits, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
}

#[tool_router(router = sandbox_tools, vis = "pub(super)")]
impl ForkdMcp {
    #[tool(description = "Fork new sandboxes (copy-on-write microVMs) from a ready snapshot, in \
        milliseconds each. Every sandbox has its own id, hostname and entropy and starts exactly \
        where the snapshot was (files, warm Python interpreter). Answers {\"sandboxes\": [{id, \
        hostname, status, ...}]}; pass an `id` as `sandbox_id` to the other tools. Sandboxes run \
        until kill_sandbox or their ttl_secs.")]
    async fn spawn_sandboxes(&self, Parameters(p): Parameters<SpawnParams>) -> Reply {
        if !(1..=MAX_SPAWN).contains(&p.n) {
            return Err(ToolError::invalid(format!("n must be 1 to {MAX_SPAWN}, not {}", p.n)));
        }
        let req = CreateSandboxesRequest {
            snapshot_tag: p.snapshot_tag,
            n: Some(p.n),
            memory_limit_mib: p.memory_limit_mib.unwrap_or(0),
            cpu_quota: p.cpu_quota.unwrap_or(0.0),
            network: match p.network {
                Some(Network::Nat) => "nat",
                Some(Network::None) => "none",
                None => "",
            }
            .to_string(),
            allow: p.allow,
            ttl_secs: p.ttl_secs.unwrap_or(0),
            idle_timeout_secs: p.idle_timeout_secs.unwrap_or(0),
            labels: p.labels,
            ..Default::default()
        };
        let resp = unary(&self.conn, self.conn.sandboxes().create_sandboxes(req)).await?;
        let sandboxes: Vec<_> = resp
            .sandboxes
            .iter()
            .map(|s| {
                let mut v = sandbox_brief(s);
                v["spawn_ms"] = s.spawn_ms.into();
                v
            })
            .collect();
        Ok(Answer(json!({ "sandboxes": sandboxes })))
    }

    #[tool(
        description = "List live sandboxes (optionally only those of one snapshot). Answers \
            {\"sandboxes\": [{id, snapshot_tag, status, hostname, created_at_unix, expires_at_unix \
            (0 = never), labels}]}.",
        annotations(read_only_hint = true)
    )]
    async fn list_sandboxes(&self, Parameters(p): Parameters<ListSandboxesParams>) -> Reply {
        let tag = p.snapshot_tag.unwrap_or_default();
        let mut all = Vec::new();
        let mut page_token = String::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let req = ListSandboxesRequest { snapshot_tag: tag.clone(), page_size: 0, page_token };
            let resp = unary(&self.conn, self.conn.sandboxes().list_sandboxes(req)).await?;
            all.extend(resp.sandboxes.iter().map(sandbox_brief));
            if resp.next_page_token.is_empty() || !seen.insert(resp.next_page_token.clone()) {
                break;
            }
            page_token = resp.next_page_token;
        }
        Ok(Answer(json!({ "sandboxes": all })))
    }

    #[tool(
        description = "Show everything about one sandbox: status (\"running\", \"exited\", \
            \"killed\", \"failed\"), snapshot, hostname, limits (memory_limit_mib, cpu_quota, \
            pids_limit), network, ttl and expiry, labels. NOT_FOUND when it does not exist (any more).",
        annotations(read_only_hint = true)
    )]
    async fn get_sandbox(&self, Parameters(p): Parameters<SandboxParams>) -> Reply {
        let req = GetSandboxRequest { id: p.sandbox_id };
        let sb = unary(&self.conn, self.conn.sandboxes().get_sandbox(req)).await?;
        Ok(Answer(json::sandbox(&sb)))
    }

    #[tool(
        description = "Kill a sandbox: its VM stops and everything in it is gone (branch_sandbox \
            first to keep its state). Killing a sandbox that is already gone succeeds. Answers \
            {\"killed\": [ids]}.",
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn kill_sandbox(&self, Parameters(p): Parameters<SandboxParams>) -> Reply {
        let req = DeleteSandboxRequest { id: p.sandbox_id };
        let resp = unary(&self.conn, self.conn.sandboxes().delete_sandbox(req)).await?;
        Ok(Answer(json!({ "killed": resp.deleted })))
    }
}
