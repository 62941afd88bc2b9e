//! `workspace create|get|list|suspend|resume|delete`.

use forkd_api::v1::{
    CreateWorkspaceRequest, DeleteWorkspaceRequest, GetWorkspaceRequest, ListWorkspacesRequest, ResumeWorkspaceRequest,
    SuspendWorkspaceRequest, Workspace,
};
use serde_json::Value;

use super::collect_pages;
use crate::args::{WorkspaceCommand, WorkspaceCreateArgs};
use crate::client::Conn;
use crate::json;
use crate::output::{age, emit, emit_json, key_values, labels, list, mib, now_unix, secs, table, timestamp};
use crate::progress::Progress;

pub async fn run(conn: &Conn, command: WorkspaceCommand, as_json: bool) -> anyhow::Result<u8> {
    let ws = match command {
        WorkspaceCommand::Create(a) => create(conn, a).await?,
        WorkspaceCommand::Get(a) => {
            let req = GetWorkspaceRequest { name: a.name.to_string() };
            conn.call(conn.workspaces().get_workspace(req)).await?
        }
        WorkspaceCommand::List => return list_all(conn, as_json).await,
        WorkspaceCommand::Suspend(a) => {
            // Suspending writes a snapshot of guest memory; that can take a
            // few seconds, so show that something is happening.
            let progress = Progress::start(format!("suspending {}", a.name));
            let req = SuspendWorkspaceRequest { name: a.name.to_string(), diff: None };
            let result = conn.call(conn.workspaces().suspend_workspace(req)).await;
            progress.finish();
            result?
        }
        WorkspaceCommand::Resume(a) => {
            let progress = Progress::start(format!("resuming {}", a.name));
            let req = ResumeWorkspaceRequest { name: a.name.to_string() };
            let result = conn.call(conn.workspaces().resume_workspace(req)).await;
            progress.finish();
            result?
        }
        WorkspaceCommand::Delete(a) => {
            let req = DeleteWorkspaceRequest { name: a.name.to_string() };
            let resp = conn.call(conn.workspaces().delete_workspace(req)).await?;
            if as_json {
                emit_json(&json::delete_workspace(&resp))?;
            } else {
                let mut out = format!("deleted workspace {}\n", a.name);
                for tag in &resp.deleted_snapshots {
                    out.push_str(&format!("deleted snapshot {tag}\n"));
                }
                emit(&out)?;
            }
            return Ok(0);
        }
    };
    if as_json {
        emit_json(&json::workspace(&ws))?;
    } else {
        emit(&key_values(&details(&ws, now_unix())))?;
    }
    Ok(0)
}

async fn create(conn: &Conn, a: WorkspaceCreateArgs) -> anyhow::Result<Workspace> {
    let r = a.resources;
    let req = CreateWorkspaceRequest {
        per_child_netns: false,
        name: a.name.to_string(),
        snapshot_tag: a.tag.to_string(),
        memory_limit_mib: r.memory_limit_mib.unwrap_or(0),
        cpu_quota: r.cpu_quota.unwrap_or(0.0),
        network: r.network.map(|n| n.as_str().to_string()).unwrap_or_default(),
        volumes: r.volumes,
        labels: r.labels.into_iter().collect(),
        ttl_secs: r.ttl.unwrap_or(0),
        idle_timeout_secs: r.idle_timeout.unwrap_or(0),
    };
    Ok(conn.call(conn.workspaces().create_workspace(req)).await?)
}

async fn list_all(conn: &Conn, as_json: bool) -> anyhow::Result<u8> {
    let workspaces = collect_pages(|page_token| {
        let req = ListWorkspacesRequest { page_size: 0, page_token };
        async move {
            let resp = conn.call(conn.workspaces().list_workspaces(req)).await?;
            Ok((resp.workspaces, resp.next_page_token))
        }
    })
    .await?;
    if as_json {
        emit_json(&Value::Array(workspaces.iter().map(json::workspace).collect()))?;
        return Ok(0);
    }
    let now = now_unix();
    emit(&table(
        &["NAME", "STATUS", "SANDBOX", "SNAPSHOT", "STATE", "UPDATED"],
        workspaces.iter().map(|w| {
            vec![
                w.name.clone(),
                w.status.clone(),
                w.live_sandbox_id.clone(),
                w.source_snapshot_tag.clone(),
                w.state_tag.clone(),
                age(w.updated_at_unix, now),
            ]
        }),
    ))?;
    Ok(0)
}

fn details(w: &Workspace, now: i64) -> Vec<(&'static str, String)> {
    vec![
        ("name", w.name.clone()),
        ("status", w.status.clone()),
        ("status_reason", w.status_reason.clone()),
        ("live_sandbox_id", w.live_sandbox_id.clone()),
        ("source_snapshot_tag", w.source_snapshot_tag.clone()),
        ("state_tag", w.state_tag.clone()),
        ("memory_limit", mib(w.memory_limit_mib)),
        ("cpu_quota", if w.cpu_quota > 0.0 { format!("{} cores", w.cpu_quota) } else { String::new() }),
        ("network", w.network.clone()),
        ("volumes", list(&w.volumes)),
        ("labels", labels(&w.labels)),
        ("ttl", secs(w.ttl_secs)),
        ("idle_timeout", secs(w.idle_timeout_secs)),
        ("created", timestamp(w.created_at_unix, now)),
        ("updated", timestamp(w.updated_at_unix, now)),
        ("suspended", timestamp(w.suspended_at_unix, now)),
    ]
}
