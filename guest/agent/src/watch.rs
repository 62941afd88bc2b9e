//! File watching with inotify: create, write, remove, rename and chmod
//! events under a directory (recursively, including directories created
//! later), sent in order in small batches.
//!
//! The queue between the guest's file system and the host is bounded at
//! every step: the kernel's inotify queue (it reports `IN_Q_OVERFLOW` when
//! full), one read buffer here, and a lossy queue on the host. A loss
//! anywhere reaches the client as an overflow flag, never as memory.

use crate::server::{Agent, error, io_error};
use crate::sys;
use forkd_agent_protocol::v1::{
    AgentError, FileEvent, WatchEvents, WatchRequest, agent_error::Kind, file_event::Kind as EventKind,
    response::Body as Resp,
};
use std::collections::HashMap;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Events per frame: small batches keep each frame cheap for the host.
const BATCH: usize = 64;
/// Most directories watched by one request.
const MAX_DIRS: usize = 8192;
const POLL: Duration = Duration::from_millis(250);
/// How long a lone MOVED_FROM waits for its MOVED_TO.
const PAIR_WAIT: Duration = Duration::from_millis(50);
const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;

struct Watcher {
    fd: OwnedFd,
    root: String,
    dirs: HashMap<i32, String>,
    recursive: bool,
}

impl Watcher {
    /// Watches `dir` and, when recursive, every directory below it. With
    /// `found`, what is already inside a newly created directory (made
    /// before its watch existed) is reported as created.
    fn add_tree(&mut self, dir: &str, mut found: Option<&mut Vec<FileEvent>>) -> Result<(), AgentError> {
        let mut todo = vec![dir.to_string()];
        while let Some(d) = todo.pop() {
            if self.dirs.len() >= MAX_DIRS {
                return Err(error(Kind::TooLarge, format!("more than {MAX_DIRS} directories to watch")));
            }
            let c = sys::cstr(&d).map_err(|e| io_error("watch path", &e))?;
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd < 0 {
                let e = std::io::Error::last_os_error();
                if d == dir {
                    return Err(io_error(&format!("watch {d}"), &e));
                }
                continue; // removed meanwhile
            }
            self.dirs.insert(wd, d.clone());
            if !self.recursive {
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let path = e.path().to_string_lossy().into_owned();
                    let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                    if let Some(f) = found.as_deref_mut() {
                        f.push(FileEvent {
                            kind: EventKind::Create as i32,
                            path: path.clone(),
                            from: String::new(),
                            is_dir,
                        });
                    }
                    if is_dir {
                        todo.push(path);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs a watch until `cancelled`: an empty first batch says it is armed.
pub fn run(agent: &Arc<Agent>, id: u64, req: WatchRequest, cancelled: &AtomicBool) -> Result<(), AgentError> {
    if !req.path.starts_with('/') {
        return Err(error(Kind::Invalid, format!("{:?} is not an absolute path", req.path)));
    }
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io_error("inotify_init1", &std::io::Error::last_os_error()));
    }
    let root = req.path.trim_end_matches('/').to_string();
    let root = if root.is_empty() { "/".to_string() } else { root };
    let mut w = Watcher {
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        root: root.clone(),
        dirs: HashMap::new(),
        recursive: req.recursive,
    };
    w.add_tree(&root, None)?;
    agent.send(id, Resp::WatchEvents(WatchEvents::default()));
    let mut buf = vec![0u8; 64 * 1024];
    while !cancelled.load(Ordering::SeqCst) {
        match sys::poll_one(w.fd.as_raw_fd(), libc::POLLIN, Some(POLL)) {
            Ok(r) if r & libc::POLLIN != 0 => {}
            _ => continue,
        }
        let mut batch = Vec::new();
        match sys::read(w.fd.as_raw_fd(), &mut buf) {
            Ok(n) => batch.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
        // A rename is two records; when a read ends between them, wait a
        // moment for the second so they pair up.
        while ends_with_move_from(&batch) && batch.len() < 4 * buf.len() {
            match sys::poll_one(w.fd.as_raw_fd(), libc::POLLIN, Some(PAIR_WAIT)) {
                Ok(r) if r & libc::POLLIN != 0 => {}
                _ => break,
            }
            match sys::read(w.fd.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => batch.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let (events, overflow, gone) = decode(&mut w, &batch);
        if overflow {
            agent.send(id, Resp::WatchEvents(WatchEvents { events: vec![], overflow: true }));
        }
        for batch in events.chunks(BATCH) {
            agent.send(id, Resp::WatchEvents(WatchEvents { events: batch.to_vec(), overflow: false }));
        }
        if gone {
            return Err(error(Kind::NotFound, format!("{root} was removed")));
        }
    }
    Ok(())
}

/// Whether the last record in `buf` is a MOVED_FROM.
fn ends_with_move_from(buf: &[u8]) -> bool {
    let header = std::mem::size_of::<libc::inotify_event>();
    let (mut at, mut last) = (0, 0u32);
    while at + header <= buf.len() {
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        last = ev.mask;
        at += header + ev.len as usize;
    }
    last & libc::IN_MOVED_FROM != 0
}

/// Turns a buffer of inotify records into events. Returns the events,
/// whether the kernel queue overflowed, and whether the root went away.
fn decode(w: &mut Watcher, buf: &[u8]) -> (Vec<FileEvent>, bool, bool) {
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut out: Vec<FileEvent> = Vec::new();
    let mut overflow = false;
    let mut gone = false;
    // A MOVED_FROM waiting for its MOVED_TO (same cookie): index into `out`.
    let mut moves: HashMap<u32, usize> = HashMap::new();
    let mut at = 0;
    while at + header <= buf.len() {
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let name_len = ev.len as usize;
        let name_bytes = &buf[(at + header).min(buf.len())..(at + header + name_len).min(buf.len())];
        at += header + name_len;
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            overflow = true;
            continue;
        }
        let Some(dir) = w.dirs.get(&ev.wd).cloned() else { continue };
        if ev.mask & libc::IN_IGNORED != 0 {
            w.dirs.remove(&ev.wd);
            continue;
        }
        if ev.mask & libc::IN_DELETE_SELF != 0 {
            gone |= dir == w.root;
            continue;
        }
        let name = CStr::from_bytes_until_nul(name_bytes)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(name_bytes).into_owned());
        let path = if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") };
        let is_dir = ev.mask & libc::IN_ISDIR != 0;
        let kind = if ev.mask & libc::IN_CREATE != 0 {
            EventKind::Create
        } else if ev.mask & libc::IN_MODIFY != 0 {
            EventKind::Write
        } else if ev.mask & libc::IN_DELETE != 0 {
            EventKind::Remove
        } else if ev.mask & libc::IN_ATTRIB != 0 {
            EventKind::Chmod
        } else if ev.mask & libc::IN_MOVED_FROM != 0 {
            // Taken as a removal unless its MOVED_TO follows.
            moves.insert(ev.cookie, out.len());
            EventKind::Remove
        } else if ev.mask & libc::IN_MOVED_TO != 0 {
            if let Some(i) = moves.remove(&ev.cookie) {
                let from = std::mem::take(&mut out[i].path);
                out[i] = FileEvent { kind: EventKind::Rename as i32, path: path.clone(), from, is_dir };
                if is_dir && w.recursive {
                    let _ = w.add_tree(&path, None);
                }
                continue;
            }
            EventKind::Create
        } else {
            continue;
        };
        out.push(FileEvent { kind: kind as i32, path: path.clone(), from: String::new(), is_dir });
        if is_dir && w.recursive && kind == EventKind::Create {
            let _ = w.add_tree(&path, Some(&mut out));
        }
    }
    (out, overflow, gone)
}
