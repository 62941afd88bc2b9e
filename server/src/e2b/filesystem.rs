//! envd's `filesystem.Filesystem` service on forkd's guest agent: Stat,
//! MakeDir, Move, ListDir (to a depth), Remove, WatchDir (a stream) and the
//! polling watchers (CreateWatcher, GetWatcherEvents, RemoveWatcher) that
//! the synchronous Python SDK uses.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use forkd_agent_protocol::v1 as pb;
use forkd_api::e2b::filesystem as fs;
use forkd_api::v1 as api;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::connect::{self, Call, decode, frame};
use super::process::Target;
use super::sandboxes;
use super::watchers::Watchers;
use crate::api::guest_files::FILE_OP_TIMEOUT;
use crate::api::process as procs;
use crate::core::Error;

/// Most entries one ListDir returns.
const MAX_LIST: usize = 10_000;
/// Deepest ListDir.
const MAX_DEPTH: u32 = 64;

pub async fn call(
    t: Target<'_>,
    watchers: &Arc<Watchers>,
    method: &str,
    call: Call,
    body: &[u8],
) -> Result<axum::response::Response, Status> {
    let payload = if call.streaming { connect::single_envelope(body)? } else { body };
    let enc = call.encoding;
    match method {
        "Stat" => {
            let req: fs::StatRequest = decode(enc, payload)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let st = sb.agent.stat(path(&req.path)?, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
            Ok(connect::unary(&call, &fs::StatResponse { entry: Some(entry(st)) }))
        }
        "MakeDir" => {
            let req: fs::MakeDirRequest = decode(enc, payload)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let st = sb.agent.make_dir(path(&req.path)?, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
            Ok(connect::unary(&call, &fs::MakeDirResponse { entry: Some(entry(st)) }))
        }
        "Move" => {
            let req: fs::MoveRequest = decode(enc, payload)?;
            let (from, to) = (path(&req.source)?, path(&req.destination)?);
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let st = sb.agent.rename(from, to, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
            Ok(connect::unary(&call, &fs::MoveResponse { entry: Some(entry(st)) }))
        }
        "Remove" => {
            let req: fs::RemoveRequest = decode(enc, payload)?;
            let p = path(&req.path)?;
            if p == "/" {
                return Err(Status::invalid_argument("refusing to remove /"));
            }
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            sb.agent.remove(p, true, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
            Ok(connect::unary(&call, &fs::RemoveResponse {}))
        }
        "ListDir" => {
            let req: fs::ListDirRequest = decode(enc, payload)?;
            let depth = req.depth.clamp(1, MAX_DEPTH);
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let root = path(&req.path)?;
            let top = sb.agent.stat(root.clone(), FILE_OP_TIMEOUT).await.map_err(Error::from)?;
            if !top.is_dir {
                return Err(Status::invalid_argument(format!("{root} is not a directory")));
            }
            let mut entries = vec![];
            let mut queue = VecDeque::from([(top.path, 1u32)]);
            while let Some((dir, level)) = queue.pop_front() {
                let listing = sb.agent.list_dir(dir, FILE_OP_TIMEOUT).await.map_err(Error::from)?;
                for st in listing.entries {
                    if entries.len() >= MAX_LIST {
                        return Err(Status::resource_exhausted(format!(
                            "{root} has more than {MAX_LIST} entries within depth {depth}"
                        )));
                    }
                    if st.is_dir && !st.is_symlink && level < depth {
                        queue.push_back((st.path.clone(), level + 1));
                    }
                    entries.push(entry(st));
                }
            }
            Ok(connect::unary(&call, &fs::ListDirResponse { entries }))
        }
        "WatchDir" => {
            let req: fs::WatchDirRequest = decode(enc, payload)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let root = path(&req.path)?;
            let wreq = pb::WatchRequest { path: root.clone(), recursive: req.recursive };
            let armed = procs::arm_watch(&sb, &wreq).await?;
            let (etx, mut erx) = mpsc::channel(32);
            tokio::spawn(procs::watch(sb, wreq, armed, etx));
            let (tx, rx) = mpsc::channel::<Bytes>(32);
            tokio::spawn(async move {
                use fs::watch_dir_response::{Event, KeepAlive, StartEvent};
                let wrap = |e: Event| frame(enc, &fs::WatchDirResponse { event: Some(e) });
                if tx.send(wrap(Event::Start(StartEvent {}))).await.is_err() {
                    return;
                }
                let deadline = call.timeout.map(|t| Instant::now() + t);
                let mut keepalive = call.keepalive.map(|every| tokio::time::interval_at(Instant::now() + every, every));
                loop {
                    let frames: Vec<Bytes> = tokio::select! {
                        got = erx.recv() => match got {
                            Some(Ok(batch)) => events(&root, batch).into_iter().map(|e| wrap(Event::Filesystem(e))).collect(),
                            Some(Err(s)) => {
                                let _ = tx.send(connect::end_frame(Some(&s))).await;
                                return;
                            }
                            None => {
                                let _ = tx.send(connect::end_frame(Some(&Status::unavailable("the sandbox went away")))).await;
                                return;
                            }
                        },
                        _ = async { keepalive.as_mut().expect("guarded").tick().await }, if keepalive.is_some() => {
                            vec![wrap(Event::Keepalive(KeepAlive {}))]
                        }
                        _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                            let _ = tx.send(connect::end_frame(None)).await;
                            return;
                        }
                    };
                    for f in frames {
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(connect::stream(&call, rx))
        }
        "CreateWatcher" => {
            let req: fs::CreateWatcherRequest = decode(enc, payload)?;
            let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let root = path(&req.path)?;
            let wreq = pb::WatchRequest { path: root.clone(), recursive: req.recursive };
            let armed = procs::arm_watch(&sb, &wreq).await?;
            let watcher_id = watchers.start(t.sandbox, &t.principal.owner(), sb, wreq, armed)?;
            Ok(connect::unary(&call, &fs::CreateWatcherResponse { watcher_id }))
        }
        "GetWatcherEvents" => {
            let req: fs::GetWatcherEventsRequest = decode(enc, payload)?;
            let events = watchers.take(&req.watcher_id, t.sandbox, &t.principal.owner())?;
            Ok(connect::unary(&call, &fs::GetWatcherEventsResponse { events }))
        }
        "RemoveWatcher" => {
            let req: fs::RemoveWatcherRequest = decode(enc, payload)?;
            watchers.remove(&req.watcher_id, t.sandbox, &t.principal.owner())?;
            Ok(connect::unary(&call, &fs::RemoveWatcherResponse {}))
        }
        other => Err(Status::unimplemented(format!("filesystem.Filesystem/{other} does not exist"))),
    }
}

/// A guest path from a request: non-empty, no NUL; relative paths are the
/// agent's (relative to the home directory).
pub fn path(p: &str) -> Result<String, Status> {
    if p.is_empty() {
        return Err(Status::invalid_argument("path is required"));
    }
    if p.contains('\0') || p.len() > 4096 {
        return Err(Status::invalid_argument("path must be at most 4096 bytes without NUL"));
    }
    Ok(p.to_string())
}

/// `ls -l`-style permissions of a mode (`-rw-r--r--`).
pub fn permissions(mode: u32, is_dir: bool, is_symlink: bool) -> String {
    let kind = if is_symlink {
        'l'
    } else if is_dir {
        'd'
    } else {
        '-'
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub fn entry(st: pb::FileStat) -> fs::EntryInfo {
    let kind = if st.is_symlink {
        fs::FileType::Symlink
    } else if st.is_dir {
        fs::FileType::Directory
    } else {
        fs::FileType::File
    };
    fs::EntryInfo {
        permissions: permissions(st.mode, st.is_dir, st.is_symlink),
        name: st.name,
        r#type: kind as i32,
        path: st.path,
        size: st.size.min(i64::MAX as u64) as i64,
        mode: st.mode & 0o7777,
        owner: st.owner,
        group: st.group,
        modified_time: Some(prost_types::Timestamp { seconds: st.mtime_unix, nanos: 0 }),
        symlink_target: st.is_symlink.then_some(st.symlink_target),
        metadata: Default::default(),
        is_symlink: st.is_symlink,
    }
}

/// E2B names an event's path relative to the watched directory; a rename
/// is the old name going (RENAME) and the new one appearing (CREATE).
pub fn events(root: &str, batch: api::FileEvents) -> Vec<fs::FilesystemEvent> {
    use api::file_event::Kind;
    let rel = |p: &str| -> String {
        let base = root.trim_end_matches('/');
        p.strip_prefix(base).map(|r| r.trim_start_matches('/').to_string()).unwrap_or_else(|| p.to_string())
    };
    let ev = |name: String, t: fs::EventType| fs::FilesystemEvent { name, r#type: t as i32, entry: None };
    let mut out = vec![];
    for e in batch.events {
        match Kind::try_from(e.kind).unwrap_or(Kind::Write) {
            Kind::Create => out.push(ev(rel(&e.path), fs::EventType::Create)),
            Kind::Write => out.push(ev(rel(&e.path), fs::EventType::Write)),
            Kind::Remove => out.push(ev(rel(&e.path), fs::EventType::Remove)),
            Kind::Chmod => out.push(ev(rel(&e.path), fs::EventType::Chmod)),
            Kind::Rename => {
                if !e.from.is_empty() {
                    out.push(ev(rel(&e.from), fs::EventType::Rename));
                }
                out.push(ev(rel(&e.path), fs::EventType::Create));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions(0o100644, false, false), "-rw-r--r--");
        assert_eq!(permissions(0o40755, true, false), "drwxr-xr-x");
    }

    #[test]
    fn event_names_are_relative_and_renames_split() {
        let batch = api::FileEvents {
            overflow: false,
            events: vec![
                api::FileEvent {
                    kind: api::file_event::Kind::Write as i32,
                    path: "/w/a/b.txt".into(),
                    ..Default::default()
                },
                api::FileEvent {
                    kind: api::file_event::Kind::Rename as i32,
                    path: "/w/new".into(),
                    from: "/w/old".into(),
                    is_dir: false,
                },
            ],
        };
        let got: Vec<(String, i32)> = events("/w/", batch).into_iter().map(|e| (e.name, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                ("a/b.txt".into(), fs::EventType::Write as i32),
                ("old".into(), fs::EventType::Rename as i32),
                ("new".into(), fs::EventType::Create as i32),
            ]
        );
    }
}
