//! Snapshot commands: images, snapshot (create or branch), snapshot-info,
//! rmi, compact, snapshot-diff.

use std::time::Duration;

use forkd_api::v1::{
    BranchRequest, CompactSnapshotRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DeriveSnapshotRequest,
    GetSnapshotRequest, ListPoolsRequest, ListSnapshotsRequest, SetPoolRequest, ShareSnapshotRequest, Snapshot,
};
use serde_json::Value;

use super::collect_pages;
use crate::args::{CompactArgs, ImagesArgs, PoolCommand, RmiArgs, ShareArgs, SnapshotArgs, SnapshotDiffArgs, TagArg};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, USAGE};
use crate::json;
use crate::output::{
    NONE, age, emit, emit_json, human_bytes, key_values, labels, list, mib, millis, now_unix, table, timestamp,
};
use crate::progress::Progress;

/// How often a snapshot that is still being written is polled.
const POLL_EVERY: Duration = Duration::from_millis(500);

pub async fn images(conn: &Conn, args: ImagesArgs, as_json: bool) -> anyhow::Result<u8> {
    let status = args.status.unwrap_or_default();
    let snapshots = collect_pages(|page_token| {
        let req = ListSnapshotsRequest { page_size: 0, page_token, status: status.clone() };
        async move {
            let resp = conn.call(conn.snapshots().list_snapshots(req)).await?;
            Ok((resp.snapshots, resp.next_page_token))
        }
    })
    .await?;

    if as_json {
        emit_json(&Value::Array(snapshots.iter().map(json::snapshot).collect()))?;
        return Ok(0);
    }
    let now = now_unix();
    emit(&table(
        &["TAG", "STATUS", "KIND", "PARENT", "IMAGE", "MEM", "SIZE", "CREATED"],
        snapshots.iter().map(|s| {
            vec![
                s.tag.clone(),
                s.status.clone(),
                s.kind.clone(),
                s.parent_tag.clone(),
                s.image.clone(),
                mib(s.mem_mib),
                human_bytes(s.physical_size_bytes),
                age(s.created_at_unix, now),
            ]
        }),
    ))?;
    Ok(0)
}

pub async fn snapshot(conn: &Conn, args: SnapshotArgs, as_json: bool) -> anyhow::Result<u8> {
    match &args.from_sandbox {
        Some(_) => branch(conn, args, as_json).await,
        None => create(conn, args, as_json).await,
    }
}

async fn create(conn: &Conn, args: SnapshotArgs, as_json: bool) -> anyhow::Result<u8> {
    // clap enforces both when --from-sandbox is absent.
    let Some(tag) = args.tag.filter(|_| args.image.is_some() || args.rootfs.is_some()) else {
        return Err(CliError::usage("--tag and --image (or --rootfs) are required").into());
    };
    let req = CreateSnapshotRequest {
        tag: tag.to_string(),
        image: args.image.unwrap_or_default(),
        kernel: args.kernel.unwrap_or_default(),
        boot_wait_secs: args.boot_wait_secs.unwrap_or(0),
        rootfs: args.rootfs.unwrap_or_default(),
        rw: None,
        tap: String::new(),
        vcpus: args.vcpus.unwrap_or(0),
        mem_mib: args.mem_mib.unwrap_or(0),
        warm_timeout_secs: args.warm_timeout.unwrap_or(0),
        warm_eval: args.warm_eval.unwrap_or_default(),
        volumes: args.volumes,
        labels: args.labels.into_iter().collect(),
        // Polled below instead, so progress can be shown and a dropped
        // connection does not lose track of the snapshot.
        wait: Some(false),
    };
    let snap = conn.call(conn.snapshots().create_snapshot(req)).await?;
    if args.no_wait {
        if as_json {
            emit_json(&json::snapshot(&snap))?;
        } else {
            emit(&format!("{}: {} (follow with: forkd snapshot-info {})\n", snap.tag, snap.status, snap.tag))?;
        }
        return Ok(0);
    }
    settle_and_show(conn, snap, &format!("snapshot {tag}"), as_json).await
}

async fn branch(conn: &Conn, args: SnapshotArgs, as_json: bool) -> anyhow::Result<u8> {
    let id = args.from_sandbox.expect("branch needs --from-sandbox");
    let req = BranchRequest {
        id: id.to_string(),
        tag: args.tag.map(|t| t.to_string()).unwrap_or_default(),
        mode: if args.measure {
            "measure"
        } else if args.full {
            "full"
        } else {
            "diff"
        }
        .to_string(),
        diff: None,
        measure_diff: false,
        wait: Some(!args.no_wait),
        live: false,
        parent_tag: String::new(),
    };
    let progress = Progress::start(format!("branching {id}"));
    let result = conn.call(conn.sandboxes().branch(req)).await;
    progress.finish();
    let snap = result?;

    if args.measure {
        if as_json {
            emit_json(&json::snapshot(&snap))?;
        } else {
            emit(&key_values(&[
                ("dirty_bytes", snap.dirty_bytes.to_string()),
                ("dirty", human_bytes(snap.dirty_bytes)),
            ]))?;
        }
        return Ok(0);
    }
    let snap = if args.no_wait {
        snap
    } else {
        let label = format!("snapshot {}", snap.tag);
        settle(conn, snap, &label).await?
    };
    if !args.no_wait {
        report(&snap, as_json)?;
    }
    if as_json {
        emit_json(&json::snapshot(&snap))?;
    } else {
        emit(&key_values(&[
            ("tag", snap.tag.clone()),
            ("status", snap.status.clone()),
            ("kind", snap.kind.clone()),
            ("parent_tag", snap.parent_tag.clone()),
            ("branched_from", snap.branched_from.clone()),
            ("pause_ms", format!("{:.2}", snap.pause_ms_exact)),
            ("dirty_bytes", format!("{} ({})", snap.dirty_bytes, human_bytes(snap.dirty_bytes))),
        ]))?;
    }
    Ok(0)
}

/// Statuses after which a snapshot no longer changes on its own.
fn is_settled(status: &str) -> bool {
    matches!(status, "ready" | "failed" | "deleting")
}

/// Waits for a snapshot an RPC just made to settle, then prints it (and its
/// failure, if it failed).
pub(super) async fn settle_and_show(conn: &Conn, snap: Snapshot, label: &str, as_json: bool) -> anyhow::Result<u8> {
    let snap = settle(conn, snap, label).await?;
    report(&snap, as_json)?;
    if as_json {
        emit_json(&json::snapshot(&snap))?;
    } else {
        emit(&summary(&snap))?;
    }
    Ok(0)
}

/// Polls until the snapshot is no longer being written, showing progress.
pub(super) async fn settle(conn: &Conn, mut snap: Snapshot, label: &str) -> anyhow::Result<Snapshot> {
    if is_settled(&snap.status) {
        return Ok(snap);
    }
    let mut progress = Progress::start(label);
    let tag = snap.tag.clone();
    let result = async {
        loop {
            progress.status(if snap.status.is_empty() { "pending" } else { &snap.status });
            if is_settled(&snap.status) {
                return Ok(snap);
            }
            tokio::time::sleep(POLL_EVERY).await;
            let req = GetSnapshotRequest { tag: tag.clone() };
            snap = conn.call(conn.snapshots().get_snapshot(req)).await?;
        }
    }
    .await;
    progress.finish();
    result
}

/// Turns a snapshot that ended anywhere but "ready" into an error (after
/// printing it in JSON mode, so scripts still see the record).
pub(super) fn report(snap: &Snapshot, as_json: bool) -> anyhow::Result<()> {
    if snap.status == "ready" {
        return Ok(());
    }
    if as_json {
        emit_json(&json::snapshot(snap))?;
    }
    let reason = if snap.status_reason.is_empty() { "no reason given".to_string() } else { snap.status_reason.clone() };
    Err(CliError::new(FAILURE, format!("snapshot {} {}: {reason}", snap.tag, snap.status)).into())
}

/// One line about a ready snapshot.
fn summary(s: &Snapshot) -> String {
    let mut parts = vec![format!("{} ready", s.tag)];
    if !s.kind.is_empty() {
        parts.push(format!("kind {}", s.kind));
    }
    if !s.image.is_empty() {
        parts.push(format!("image {}", s.image));
    }
    if s.mem_mib > 0 {
        parts.push(format!("{} memory", mib(s.mem_mib)));
    }
    parts.push(format!("{} on disk", human_bytes(s.physical_size_bytes)));
    if s.warm_ms > 0.0 {
        parts.push(format!("warm in {}", millis(s.warm_ms)));
    }
    format!("{}\n", parts.join(", "))
}

pub async fn info(conn: &Conn, args: TagArg, as_json: bool) -> anyhow::Result<u8> {
    let req = GetSnapshotRequest { tag: args.tag.to_string() };
    let s = conn.call(conn.snapshots().get_snapshot(req)).await?;
    if as_json {
        emit_json(&json::snapshot(&s))?;
    } else {
        emit(&key_values(&info_lines(&s, now_unix())))?;
    }
    Ok(0)
}

fn info_lines(s: &Snapshot, now: i64) -> Vec<(&'static str, String)> {
    let size = |bytes: u64| format!("{} ({bytes} bytes)", human_bytes(bytes));
    let ms = |v: f64| if v > 0.0 { millis(v) } else { NONE.into() };
    vec![
        ("tag", s.tag.clone()),
        ("status", s.status.clone()),
        ("status_reason", s.status_reason.clone()),
        ("kind", s.kind.clone()),
        ("image", s.image.clone()),
        ("runtime", s.runtime.clone()),
        ("backend", s.backend.clone()),
        ("accel", s.accel.clone()),
        ("vcpus", s.vcpus.to_string()),
        ("mem_mib", mib(s.mem_mib)),
        ("parent_tag", s.parent_tag.clone()),
        // Root first, as the API orders it, ending at the parent.
        ("ancestors", s.ancestors.join(" -> ")),
        ("chain_depth", s.chain_depth.to_string()),
        ("dependents", list(&s.dependents)),
        ("logical_size", size(s.logical_size_bytes)),
        ("physical_size", size(s.physical_size_bytes)),
        ("memory_digest", s.memory_digest.clone()),
        ("state_digest", s.state_digest.clone()),
        ("parent_memory_digest", s.parent_memory_digest.clone()),
        ("created", timestamp(s.created_at_unix, now)),
        ("branched_from", s.branched_from.clone()),
        ("pause_ms", ms(s.pause_ms_exact)),
        ("dirty_bytes", if s.dirty_bytes > 0 { size(s.dirty_bytes) } else { NONE.into() }),
        ("warm_ms", ms(s.warm_ms)),
        ("volumes", list(&s.volumes)),
        ("volume_slots", s.volume_slots.to_string()),
        ("labels", labels(&s.labels)),
        ("live_sandboxes", s.live_sandboxes.to_string()),
    ]
}

pub async fn rmi(conn: &Conn, args: RmiArgs, as_json: bool) -> anyhow::Result<u8> {
    // Every tag is tried even after a failure, like rm(1); the exit code is
    // the first failure's.
    let mut first_error: Option<u8> = None;
    let mut results = Vec::new();
    for tag in &args.tags {
        let req = DeleteSnapshotRequest { tag: tag.to_string(), cascade: args.cascade, force: args.force };
        match conn.call(conn.snapshots().delete_snapshot(req)).await {
            Ok(resp) => {
                if !as_json {
                    let mut out = String::new();
                    for t in &resp.deleted {
                        out.push_str(&format!("deleted {t}\n"));
                    }
                    for t in &resp.orphaned {
                        out.push_str(&format!("orphaned {t} (now failed)\n"));
                    }
                    emit(&out)?;
                }
                results.push(json::delete_snapshot(&resp));
            }
            Err(e) => {
                eprintln!("forkd: {tag}: {e}");
                first_error.get_or_insert(e.code);
            }
        }
    }
    if as_json {
        // One object for all tags, so the output is a single JSON document.
        let mut deleted = Vec::new();
        let mut orphaned = Vec::new();
        for r in &results {
            deleted.extend(r["deleted"].as_array().cloned().unwrap_or_default());
            orphaned.extend(r["orphaned"].as_array().cloned().unwrap_or_default());
        }
        emit_json(&serde_json::json!({ "deleted": deleted, "orphaned": orphaned }))?;
    }
    Ok(first_error.unwrap_or(0))
}

pub async fn compact(conn: &Conn, args: CompactArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = CompactSnapshotRequest { tag: args.tag.to_string(), to: args.to.to_string() };
    let progress = Progress::start(format!("compacting {} into {}", args.tag, args.to));
    let result = conn.call(conn.snapshots().compact_snapshot(req)).await;
    progress.finish();
    settle_and_show(conn, result?, &format!("snapshot {}", args.to), as_json).await
}

pub async fn share(conn: &Conn, args: ShareArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = ShareSnapshotRequest { tag: args.tag.to_string(), shared: !args.off };
    let snap = conn.call(conn.snapshots().share_snapshot(req)).await?;
    if as_json {
        emit_json(&json::snapshot(&snap))?;
    } else {
        emit(&format!(
            "snapshot {} is {}\n",
            snap.tag,
            if snap.shared { "shared with every tenant" } else { "private" }
        ))?;
    }
    Ok(0)
}

/// The argv of `snapshot-diff`: split like a shell, or handed to `sh -c`.
fn derive_argv(args: &SnapshotDiffArgs) -> Result<Vec<String>, CliError> {
    let Some(cmd) = &args.exec else {
        return Ok(args.argv.clone());
    };
    if args.sh {
        return Ok(vec!["sh".into(), "-c".into(), cmd.clone()]);
    }
    let argv = shell_words::split(cmd).map_err(|e| CliError::new(USAGE, format!("--exec {cmd:?}: {e}")))?;
    if argv.is_empty() {
        return Err(CliError::usage("--exec is empty"));
    }
    Ok(argv)
}

pub async fn derive(conn: &Conn, args: SnapshotDiffArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = DeriveSnapshotRequest {
        from_tag: args.from.to_string(),
        tag: args.tag.to_string(),
        exec: derive_argv(&args)?,
        timeout_secs: args.exec_timeout.unwrap_or(0),
    };
    let progress = Progress::start(format!("deriving {} from {}", args.tag, args.from));
    let result = conn.call(conn.snapshots().derive_snapshot(req)).await;
    progress.finish();
    settle_and_show(conn, result?, &format!("snapshot {}", args.tag), as_json).await
}

pub async fn pools(conn: &Conn, cmd: PoolCommand, as_json: bool) -> anyhow::Result<u8> {
    if let PoolCommand::Set(a) = cmd {
        let req = SetPoolRequest { tag: a.tag.to_string(), target: a.target, network: a.network };
        let p = conn.call(conn.snapshots().set_pool(req)).await?;
        if as_json {
            emit_json(&json::pool(&p))?;
        } else {
            emit(&format!(
                "pool of {} (network {}): keeps {}, {} ready, {} being made\n",
                p.tag, p.network, p.target, p.ready, p.filling
            ))?;
        }
        return Ok(0);
    }
    let r = conn.call(conn.snapshots().list_pools(ListPoolsRequest {})).await?;
    if as_json {
        emit_json(&Value::Array(r.pools.iter().map(json::pool).collect()))?;
    } else {
        emit(&table(
            &["TAG", "NETWORK", "READY", "FILLING", "TARGET"],
            r.pools.iter().map(|p| {
                vec![p.tag.clone(), p.network.clone(), p.ready.to_string(), p.filling.to_string(), p.target.to_string()]
            }),
        ))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn diff_args(extra: &[&str]) -> SnapshotDiffArgs {
        let mut argv = vec!["forkd", "snapshot-diff", "--from", "a", "--tag", "b"];
        argv.extend_from_slice(extra);
        match crate::args::Cli::try_parse_from(argv).unwrap().command {
            crate::args::Command::SnapshotDiff(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn derive_command_lines() {
        assert_eq!(
            derive_argv(&diff_args(&["--exec", "pip install 'a b' c"])).unwrap(),
            vec!["pip", "install", "a b", "c"]
        );
        assert_eq!(
            derive_argv(&diff_args(&["--sh", "--exec", "echo x > /y"])).unwrap(),
            vec!["sh", "-c", "echo x > /y"]
        );
        assert_eq!(derive_argv(&diff_args(&["--", "touch", "/x"])).unwrap(), vec!["touch", "/x"]);
        assert_eq!(derive_argv(&diff_args(&["--exec", "echo 'unclosed"])).unwrap_err().code, USAGE);
        assert_eq!(derive_argv(&diff_args(&["--exec", "  "])).unwrap_err().code, USAGE);
    }

    #[test]
    fn failed_snapshots_are_errors_with_the_reason() {
        let snap = Snapshot {
            tag: "py".into(),
            status: "failed".into(),
            status_reason: "guest did not boot".into(),
            ..Default::default()
        };
        let err = report(&snap, false).unwrap_err();
        assert_eq!(crate::exit::code_for_error(&err), FAILURE);
        assert_eq!(err.to_string(), "snapshot py failed: guest did not boot");
        let ready = Snapshot { status: "ready".into(), ..Default::default() };
        assert!(report(&ready, false).is_ok());
    }

    #[test]
    fn info_lists_chain_and_sizes() {
        let s = Snapshot {
            tag: "c".into(),
            parent_tag: "b".into(),
            ancestors: vec!["a".into(), "b".into()],
            dependents: vec!["d".into()],
            chain_depth: 2,
            logical_size_bytes: 256 << 20,
            ..Default::default()
        };
        let text = key_values(&info_lines(&s, 0));
        assert!(text.contains("ancestors             a -> b\n"), "{text}");
        assert!(text.contains("dependents            d\n"), "{text}");
        assert!(text.contains("logical_size          256.0 MiB (268435456 bytes)\n"), "{text}");
        assert!(text.contains("status_reason         -\n"), "{text}");
    }
}
