//! `forkd push`, `forkd pull` and `forkd remote ls`: snapshots to and from
//! the object store the daemon was started with, or (given a URL) an
//! archive moved by plain HTTP PUT and GET, as the reference's hub does.

use forkd_api::names::Tag;
use forkd_api::v1::{ExportSnapshotRequest, ListRemoteSnapshotsRequest, PullSnapshotRequest, PushSnapshotRequest};

use super::http_archive;
use crate::args::{PullArgs, PushArgs, RemoteCommand};
use crate::client::Conn;
use crate::exit::CliError;
use crate::json;
use crate::output::{age, emit, emit_json, human_bytes, now_unix, table};
use crate::progress::Progress;

pub async fn push(conn: &Conn, args: PushArgs, as_json: bool) -> anyhow::Result<u8> {
    let (tag, url) = push_targets(&args)?;
    if let Some(url) = url {
        let req = ExportSnapshotRequest {
            tag: tag.to_string(),
            description: args.description.unwrap_or_default(),
            base_image: args.base_image.unwrap_or_default(),
            ..Default::default()
        };
        return http_archive::push(conn, req, &url, as_json).await;
    }
    if args.description.is_some() || args.base_image.is_some() {
        return Err(
            CliError::usage("--description and --base-image go into an archive: give a URL to push it to").into()
        );
    }
    // The daemon reports no progress of a push or pull, only its end.
    let progress = Progress::start(format!("pushing {tag}"));
    let req = PushSnapshotRequest { tag: tag.to_string(), remote: String::new() };
    let result = conn.call(conn.snapshots().push_snapshot(req)).await;
    progress.finish();
    let r = result?;
    if as_json {
        emit_json(&serde_json::json!({
            "tag": tag.as_str(),
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
            tag,
            r.url,
            r.uploaded_blobs,
            human_bytes(r.bytes),
            r.present_blobs,
            r.seconds
        ))?;
    }
    Ok(0)
}

pub async fn pull(conn: &Conn, args: PullArgs, as_json: bool) -> anyhow::Result<u8> {
    if let Some(url) = pull_url(&args)? {
        return http_archive::pull(conn, &url, args.as_tag.as_ref(), args.force, as_json).await;
    }
    if args.as_tag.is_some() || args.force {
        return Err(CliError::usage(
            "--tag and --force are for pulling an archive from a URL; a snapshot of the remote keeps its tag",
        )
        .into());
    }
    let tag: Tag = args.target.parse().map_err(|e| CliError::usage(format!("invalid TAG {:?}: {e}", args.target)))?;
    let progress = Progress::start(format!("pulling {tag}"));
    let started = std::time::Instant::now();
    let req = PullSnapshotRequest { tag: tag.to_string(), remote: String::new() };
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

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The snapshot and, when one is given, the URL of `forkd push`: `TAG`,
/// `TAG URL` or `--tag TAG URL`.
fn push_targets(args: &PushArgs) -> Result<(Tag, Option<String>), CliError> {
    let parse = |s: &str| s.parse::<Tag>().map_err(|e| CliError::usage(format!("invalid TAG {s:?}: {e}")));
    let (tag, rest) = match (&args.tag, args.targets.as_slice()) {
        (Some(t), rest) => (t.clone(), rest),
        (None, [first, rest @ ..]) => (parse(first)?, rest),
        (None, []) => return Err(CliError::usage("name the snapshot: TAG or --tag TAG")),
    };
    match rest {
        [] => Ok((tag, None)),
        [url] if is_url(url) => Ok((tag, Some(url.clone()))),
        [other] => Err(CliError::usage(format!("{other:?} is not an http:// or https:// URL to push to"))),
        _ => Err(CliError::usage("one snapshot and at most one URL")),
    }
}

/// The archive URL `forkd pull` fetches, if its target is one: an
/// http(s) URL, or OWNER/NAME under --hub.
fn pull_url(args: &PullArgs) -> Result<Option<String>, CliError> {
    let target = args.target.as_str();
    if is_url(target) {
        return Ok(Some(target.to_string()));
    }
    let Some((owner, name)) = target.split_once('/') else { return Ok(None) };
    let valid = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid(owner) || !valid(name) || owner.starts_with('.') || name.starts_with('.') {
        return Err(CliError::usage(format!("{target:?} is neither a TAG, an http(s) URL nor OWNER/NAME")));
    }
    let Some(hub) = &args.hub else {
        return Err(CliError::usage(format!(
            "{target:?} names an archive on a hub, and there is no default hub: pass --hub URL \
             (or FORKD_HUB_URL), or the archive's own URL"
        )));
    };
    if !is_url(hub) {
        return Err(CliError::usage(format!("--hub {hub:?} is not an http:// or https:// URL")));
    }
    Ok(Some(format!("{}/{owner}/{name}.forkd-snapshot.tar.zst", hub.trim_end_matches('/'))))
}
