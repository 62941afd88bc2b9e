//! Sandbox commands: fork, ls, kill, eval, ping.

use std::io::{Read, Write};
use std::time::Instant;

use forkd_api::v1::{
    CreateSandboxesRequest, DeleteSandboxesRequest, EvalRequest, ListSandboxesRequest, PingRequest, Sandbox,
};
use serde_json::Value;

use super::collect_pages;
use crate::args::{EvalArgs, ForkArgs, IdArg, KillArgs, LsArgs};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE};
use crate::json;
use crate::output::{age, emit, emit_json, mib, millis, now_unix, table};

pub async fn fork(conn: &Conn, args: ForkArgs, as_json: bool) -> anyhow::Result<u8> {
    let r = args.resources;
    let req = CreateSandboxesRequest {
        snapshot_tag: args.tag.to_string(),
        n: Some(args.n),
        memory_limit_mib: r.memory_limit_mib.unwrap_or(0),
        cpu_quota: r.cpu_quota.unwrap_or(0.0),
        pids_limit: args.pids_limit.unwrap_or(0),
        network: r.network.map(|n| n.as_str().to_string()).unwrap_or_default(),
        allow: args.allow,
        per_child_netns: args.per_child_netns,
        ttl_secs: r.ttl.unwrap_or(0),
        idle_timeout_secs: r.idle_timeout.unwrap_or(0),
        labels: r.labels.into_iter().collect(),
        volumes: r.volumes,
        prewarm: args.prewarm,
        live_fork: args.live_fork,
        pull_missing: match (args.pull_missing, args.no_pull_missing) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        hugepages: args.hugepages,
    };
    let resp = conn.call(conn.sandboxes().create_sandboxes(req)).await?;
    if let Some(secs) = args.settle_secs {
        return settle(conn, &resp.sandboxes, secs, args.keep_workdir, as_json).await;
    }
    if as_json {
        emit_json(&sandbox_array(&resp.sandboxes))?;
    } else if args.quiet {
        let ids: String = resp.sandboxes.iter().map(|s| format!("{}\n", s.id)).collect();
        emit(&ids)?;
    } else {
        emit(&table(
            &["ID", "SNAPSHOT", "STATUS", "PID", "SPAWN"],
            resp.sandboxes.iter().map(|s| {
                vec![
                    s.id.clone(),
                    s.snapshot_tag.clone(),
                    s.status.clone(),
                    pid(s.pid),
                    if s.spawn_ms > 0.0 { millis(s.spawn_ms) } else { String::new() },
                ]
            }),
        ))?;
    }
    Ok(0)
}

/// `fork --settle-secs`: waits, counts the children that answer a ping,
/// reports, and kills them unless `keep`. Exits 1 when any died.
async fn settle(conn: &Conn, kids: &[Sandbox], secs: u64, keep: bool, as_json: bool) -> anyhow::Result<u8> {
    eprintln!("forkd: forked {} children; settling {secs} s", kids.len());
    tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    let mut alive = Vec::new();
    for s in kids {
        let ping = conn.sandboxes().ping(PingRequest { id: s.id.clone() }).await;
        if ping.is_ok() {
            alive.push(s.id.clone());
        }
    }
    let ids: Vec<String> = kids.iter().map(|s| s.id.clone()).collect();
    if !keep {
        let req = DeleteSandboxesRequest { ids: ids.clone(), ..Default::default() };
        conn.call(conn.sandboxes().delete_sandboxes(req)).await?;
    }
    if as_json {
        emit_json(&serde_json::json!({
            "forked": ids.len(), "alive": alive.len(), "settle_secs": secs, "ids": ids, "kept": keep,
        }))?;
    } else {
        let end = if keep { "left running" } else { "shut down" };
        emit(&format!("alive after {secs} s: {}/{} ({end})\n", alive.len(), ids.len()))?;
    }
    Ok(if alive.len() == ids.len() { 0 } else { 1 })
}

fn sandbox_array(sandboxes: &[Sandbox]) -> Value {
    Value::Array(sandboxes.iter().map(json::sandbox).collect())
}

fn pid(pid: u32) -> String {
    if pid == 0 { String::new() } else { pid.to_string() }
}

/// Every sandbox the caller sees (children of `tag` when not empty), all pages.
pub(super) async fn list_all(conn: &Conn, tag: &str) -> anyhow::Result<Vec<Sandbox>> {
    collect_pages(|page_token| {
        let req = ListSandboxesRequest { snapshot_tag: tag.to_string(), page_size: 0, page_token };
        async move {
            let resp = conn.call(conn.sandboxes().list_sandboxes(req)).await?;
            Ok((resp.sandboxes, resp.next_page_token))
        }
    })
    .await
}

pub async fn ls(conn: &Conn, args: LsArgs, as_json: bool) -> anyhow::Result<u8> {
    let tag = args.tag.map(|t| t.to_string()).unwrap_or_default();
    let sandboxes = list_all(conn, &tag).await?;
    if as_json {
        emit_json(&sandbox_array(&sandboxes))?;
        return Ok(0);
    }
    let now = now_unix();
    emit(&table(
        &["ID", "SNAPSHOT", "STATUS", "PID", "CREATED", "MEM_LIMIT"],
        sandboxes.iter().map(|s| {
            vec![
                s.id.clone(),
                s.snapshot_tag.clone(),
                s.status.clone(),
                pid(s.pid),
                age(s.created_at_unix, now),
                mib(s.memory_limit_mib),
            ]
        }),
    ))?;
    Ok(0)
}

pub async fn kill(conn: &Conn, args: KillArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = DeleteSandboxesRequest {
        ids: args.ids.iter().map(ToString::to_string).collect(),
        snapshot_tag: args.tag.map(|t| t.to_string()).unwrap_or_default(),
        all: args.all,
    };
    let resp = conn.call(conn.sandboxes().delete_sandboxes(req)).await?;
    if as_json {
        emit_json(&json::delete_sandboxes(&resp))?;
    } else {
        let n = resp.deleted.len();
        emit(&format!("killed {n} sandbox{}\n", if n == 1 { "" } else { "es" }))?;
    }
    Ok(0)
}

pub async fn eval(conn: &Conn, args: EvalArgs, as_json: bool) -> anyhow::Result<u8> {
    let code = if args.code == "-" {
        let mut code = String::new();
        std::io::stdin().read_to_string(&mut code).map_err(|e| anyhow::anyhow!("reading code from stdin: {e}"))?;
        code
    } else {
        args.code
    };
    let req = EvalRequest { id: args.id.to_string(), code, timeout_secs: args.timeout.unwrap_or(0) };
    let resp = conn.call(conn.sandboxes().eval(req)).await?;
    let failed = !resp.error.is_empty() || resp.exit_code != 0;
    if as_json {
        emit_json(&json::eval(&resp))?;
        return Ok(if failed { FAILURE } else { 0 });
    }
    // What the code printed comes first, in the order a REPL would show it.
    emit(&resp.stdout)?;
    if !resp.stderr.is_empty() {
        eprint!("{}", resp.stderr);
    }
    if !resp.result.is_empty() {
        emit(&with_newline(&resp.result))?;
    }
    if failed {
        let mut err = std::io::stderr().lock();
        if resp.error.is_empty() {
            writeln!(err, "forkd: evaluation failed with code {}", resp.exit_code)?;
        } else {
            write!(err, "{}", with_newline(&resp.error))?;
        }
        return Ok(FAILURE);
    }
    Ok(0)
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') { s.to_string() } else { format!("{s}\n") }
}

pub async fn ping(conn: &Conn, args: IdArg, as_json: bool) -> anyhow::Result<u8> {
    let started = Instant::now();
    let req = PingRequest { id: args.id.to_string() };
    let resp = conn.call(conn.sandboxes().ping(req)).await?;
    let round_trip_ms = started.elapsed().as_secs_f64() * 1000.0;
    if as_json {
        let mut value = json::ping(&resp);
        value["round_trip_ms"] = round_trip_ms.into();
        emit_json(&value)?;
    } else if resp.ok {
        emit(&format!(
            "{}: {} (round trip from here {}, uptime {:.1}s, runtime {})\n",
            args.id,
            millis(resp.latency_ms),
            millis(round_trip_ms),
            resp.uptime_secs,
            if resp.runtime_ready { "ready" } else { "not ready" },
        ))?;
    }
    if !resp.ok {
        return Err(CliError::new(FAILURE, format!("{} did not answer", args.id)).into());
    }
    Ok(0)
}
