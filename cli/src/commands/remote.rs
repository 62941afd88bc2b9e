//! `forkd push`, `forkd pull` and `forkd remote ls`: snapshots to and from
//! the object store the daemon was started with.

use forkd_api::v1::{ListRemoteSnapshotsRequest, PullSnapshotRequest, PushSnapshotRequest};

use crate::args::{RemoteCommand, TagArg};
use crate::client::Conn;
use crate::json;
use crate::output::{age, emit, emit_json, human_bytes, now_unix, table};
use crate::progress::Progress;

pub async fn push(conn: &Conn, args: TagArg, as_json: bool) -> anyhow::Result<u8> {
    // The daemon reports no progress of a push or pull, only its end.
    let progress = Progress::start(format!("pushing {}", args.tag));
    let req = PushSnapshotRequest { tag: args.tag.to_string(), remote: String::new() };
    let result = conn.call(conn.snapshots().push_snapshot(req)).await;
    progress.finish();
    let r = result?;
    if as_json {
        emit_json(&serde_json::json!({
            "tag": args.tag.as_str(),
            "url": r.url,
            "uploaded_bytes": r.bytes,
            "uploaded_blobs": r.uploaded_blobs,
            "present_blobs": r.present_blobs,
            "total_bytes": r.total_bytes,
            "manifest_written": r.manifest_written,
            "seconds": r.seconds,
        }))?;
    } else {
        emit(&format!(
            "pushed {} to {}: {} blob(s) uploaded ({}), {} already there, {:.1}s\n",
            args.tag,
            r.url,
            r.uploaded_blobs,
            human_bytes(r.bytes),
            r.present_blobs,
            r.seconds
        ))?;
    }
    Ok(0)
}

pub async fn pull(conn: &Conn, args: TagArg, as_json: bool) -> anyhow::Result<u8> {
    let progress = Progress::start(format!("pulling {}", args.tag));
    let started = std::time::Instant::now();
    let req = PullSnapshotRequest { tag: args.tag.to_string(), remote: String::new() };
    let result = conn.call(conn.snapshots().pull_snapshot(req)).await;
    progress.finish();
    let snap = result?;
    let secs = started.elapsed().as_secs_f64();
    if as_json {
        let mut v = json::snapshot(&snap);
        v["seconds"] = secs.into();
        emit_json(&v)?;
    } else {
        emit(&format!("pulled snapshot {} ({:.1}s)\n", snap.tag, secs))?;
    }
    Ok(0)
}

pub async fn run(conn: &Conn, c: RemoteCommand, as_json: bool) -> anyhow::Result<u8> {
    match c {
        RemoteCommand::Ls => {
            let r = conn.call(conn.snapshots().list_remote_snapshots(ListRemoteSnapshotsRequest {})).await?;
            if as_json {
                let items: Vec<_> = r
                    .snapshots
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "tag": s.tag,
                            "pushed_unix": s.pushed_unix,
                            "manifest_bytes": s.manifest_bytes,
                        })
                    })
                    .collect();
                emit_json(&serde_json::json!({ "url": r.url, "snapshots": items }))?;
            } else {
                let now = now_unix();
                emit(&table(
                    &["TAG", "PUSHED"],
                    r.snapshots.iter().map(|s| vec![s.tag.clone(), age(s.pushed_unix, now)]),
                ))?;
            }
            Ok(0)
        }
    }
}
