//! Processes of a sandbox and its files' changes: `exec -d` (start one in
//! the background), `ps`, `attach`, `signal`, and `watch`.
//!
//! A process is named by its pid or by the tag it was started with. It
//! outlives the command that started it; the daemon keeps its last 1 MiB
//! of output for `attach` and its exit status for a while after it ends.

use forkd_api::v1::{
    AttachProcessRequest, ExecResponse, FileEvent, FileEvents, ListProcessesRequest, ProcessInfo, SignalProcessRequest,
    StartProcessRequest, WatchFilesRequest, exec_event::Event,
};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use super::exec::Sink;
use crate::args::{AttachArgs, ExecArgs, IdArg, SignalArgs, WatchArgs};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, NOT_FOUND, exec_exit_code};
use crate::output::{age, emit, emit_json, human_bytes, key_values, now_unix, table};

/// Exit status of `attach` left with Ctrl-C (the process keeps running).
const DETACHED: u8 = 130;

/// `exec -d`: starts the command in the background and prints its handle.
pub async fn start(conn: &Conn, args: ExecArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = StartProcessRequest {
        id: args.id.to_string(),
        args: args.command,
        env: args.env.into_iter().collect(),
        cwd: args.cwd.unwrap_or_default(),
        tag: args.tag.unwrap_or_default(),
        pty: args.tty.then(|| super::interactive::local_size().unwrap_or(super::interactive::DEFAULT_SIZE)),
        stdin: args.stdin,
        timeout_secs: args.timeout.unwrap_or(0),
        ..Default::default()
    };
    let info = conn.call(conn.sandboxes().start_process(req)).await?;
    if as_json {
        emit_json(&process_json(&info))?;
    } else {
        emit(&key_values(&[("pid", info.pid.to_string()), ("tag", info.tag.clone())]))?;
    }
    Ok(0)
}

pub async fn ps(conn: &Conn, args: IdArg, as_json: bool) -> anyhow::Result<u8> {
    let list = conn.call(conn.sandboxes().list_processes(ListProcessesRequest { id: args.id.to_string() })).await?;
    if as_json {
        emit_json(&Value::Array(list.processes.iter().map(process_json).collect()))?;
        return Ok(0);
    }
    let now = now_unix();
    emit(&table(
        &["PID", "TAG", "STATUS", "STARTED", "OUTPUT", "COMMAND"],
        list.processes.iter().map(|p| {
            vec![
                p.pid.to_string(),
                p.tag.clone(),
                status(p),
                age(p.started_unix_ms / 1000, now),
                human_bytes(p.output_bytes),
                shell_words::join(&p.args),
            ]
        }),
    ))?;
    Ok(0)
}

/// `running`, `exited 3`, `killed by TERM`, `timed out`.
fn status(p: &ProcessInfo) -> String {
    match (&p.exit, p.running) {
        (_, true) | (None, _) => "running".into(),
        (Some(x), false) if x.timed_out => "timed out".into(),
        (Some(x), false) if x.signal > 0 => format!("killed by {}", signal_name(x.signal)),
        (Some(x), false) => format!("exited {}", x.exit_code),
    }
}

/// `TERM` for 15; the number for one without a name.
fn signal_name(n: i32) -> String {
    match nix::sys::signal::Signal::try_from(n) {
        Ok(s) => s.as_str().trim_start_matches("SIG").to_string(),
        Err(_) => n.to_string(),
    }
}

/// Replays the process's buffered output (or, with --no-replay, only what
/// comes next), follows it, and exits with its status. Ctrl-C leaves it
/// running.
pub async fn attach(conn: &Conn, args: AttachArgs) -> anyhow::Result<u8> {
    let id = args.id.to_string();
    let from_offset = if args.no_replay { find(conn, &id, &args.process).await?.output_bytes } else { 0 };
    let req = AttachProcessRequest { id, process: args.process.clone(), from_offset };
    let follow = follow(conn, req);
    match conn.deadline() {
        Some(d) => tokio::time::timeout(d, follow).await.map_err(|_| conn.deadline_error(d))?,
        None => follow.await,
    }
}

async fn follow(conn: &Conn, req: AttachProcessRequest) -> anyhow::Result<u8> {
    let process = req.process.clone();
    let mut events = conn.sandboxes().attach_process(req).await.map_err(|s| conn.status_error(&s))?.into_inner();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut out = Sink::new(std::io::stdout());
    let mut err = Sink::new(std::io::stderr());
    loop {
        let event = tokio::select! {
            msg = events.message() => match msg.map_err(|s| conn.status_error(&s))? {
                Some(e) => e,
                None => {
                    let msg = "the daemon ended the output stream without an exit status";
                    return Err(CliError::new(FAILURE, msg).into());
                }
            },
            Some(()) = interrupt.recv() => {
                eprintln!("forkd: detached; process {process} keeps running");
                return Ok(DETACHED);
            }
        };
        match event.event {
            Some(Event::Stdout(data) | Event::Pty(data)) => out.write(&data)?,
            Some(Event::Stderr(data)) => err.write(&data)?,
            Some(Event::Dropped(n)) => eprintln!("forkd: {} of earlier output is no longer kept", human_bytes(n)),
            Some(Event::Exit(x)) => {
                let code = exec_exit_code(x.exit_code, x.signal, x.timed_out);
                return Ok(u8::try_from(code).unwrap_or(FAILURE));
            }
            Some(Event::Started(_)) | None => {}
        }
    }
}

/// The process named by a pid or a tag, as listed now.
async fn find(conn: &Conn, id: &str, process: &str) -> anyhow::Result<ProcessInfo> {
    let list = conn.call(conn.sandboxes().list_processes(ListProcessesRequest { id: id.to_string() })).await?;
    let pid: Option<u32> = process.parse().ok();
    list.processes
        .into_iter()
        .find(|p| match pid {
            Some(pid) => p.pid == pid,
            None => p.tag == process,
        })
        .ok_or_else(|| CliError::new(NOT_FOUND, format!("no process {process} in {id}")).into())
}

pub async fn signal_process(conn: &Conn, args: SignalArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = SignalProcessRequest { id: args.id.to_string(), process: args.process, signal: args.signal.clone() };
    let info = conn.call(conn.sandboxes().signal_process(req)).await?;
    if as_json {
        emit_json(&process_json(&info))?;
    } else {
        let tag = if info.tag.is_empty() { String::new() } else { format!(" ({})", info.tag) };
        emit(&format!("sent {} to process {}{tag}\n", args.signal, info.pid))?;
    }
    Ok(0)
}

/// Prints file events under a guest directory until interrupted.
pub async fn watch(conn: &Conn, args: WatchArgs, as_json: bool) -> anyhow::Result<u8> {
    let req = WatchFilesRequest { id: args.id.to_string(), path: args.path.clone(), recursive: !args.no_recursive };
    // The answer comes once the guest has armed the watch: from here on no
    // change is missed, which is worth saying to whoever waits for it.
    let mut batches = conn.sandboxes().watch_files(req).await.map_err(|s| conn.status_error(&s))?.into_inner();
    eprintln!("forkd: watching {} in {}", args.path, args.id);
    loop {
        let Some(batch) = batches.message().await.map_err(|s| conn.status_error(&s))? else {
            return Err(CliError::new(FAILURE, "the daemon ended the watch").into());
        };
        emit(&render_events(&batch, as_json))?;
        if batch.overflow && !as_json {
            eprintln!("forkd: some events were lost (the watch fell behind)");
        }
    }
}

/// One line per event: `create /tmp/a`, `create /tmp/d/` (a directory),
/// `rename /tmp/b (from /tmp/a)`; or NDJSON, with `{"overflow":true}` where
/// events were lost.
fn render_events(batch: &FileEvents, as_json: bool) -> String {
    let mut out = String::new();
    if as_json && batch.overflow {
        out.push_str("{\"overflow\":true}\n");
    }
    for e in &batch.events {
        if as_json {
            out.push_str(&file_event_json(e).to_string());
        } else {
            out.push_str(&e.kind().as_str_name().to_ascii_lowercase());
            out.push(' ');
            out.push_str(&e.path);
            if e.is_dir {
                out.push('/');
            }
            if !e.from.is_empty() {
                out.push_str(&format!(" (from {})", e.from));
            }
        }
        out.push('\n');
    }
    out
}

fn file_event_json(e: &FileEvent) -> Value {
    json!({ "kind": e.kind().as_str_name(), "path": e.path, "from": e.from, "is_dir": e.is_dir })
}

/// A process as JSON, with the API's field names.
pub fn process_json(p: &ProcessInfo) -> Value {
    json!({
        "pid": p.pid,
        "tag": p.tag,
        "args": p.args,
        "cwd": p.cwd,
        "pty": p.pty,
        "stdin_open": p.stdin_open,
        "started_unix_ms": p.started_unix_ms,
        "output_bytes": p.output_bytes,
        "running": p.running,
        "exit": p.exit.as_ref().map(exit_json),
    })
}

fn exit_json(x: &ExecResponse) -> Value {
    json!({
        "exit_code": x.exit_code,
        "signal": x.signal,
        "timed_out": x.timed_out,
        "duration_ms": x.duration_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_api::v1::file_event::Kind;

    #[test]
    fn statuses() {
        let running = ProcessInfo { running: true, ..Default::default() };
        assert_eq!(status(&running), "running");
        let exit = |exit_code, signal, timed_out| ProcessInfo {
            exit: Some(ExecResponse { exit_code, signal, timed_out, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(status(&exit(3, 0, false)), "exited 3");
        assert_eq!(status(&exit(-1, 15, false)), "killed by TERM");
        assert_eq!(status(&exit(-1, 9, true)), "timed out");
        assert_eq!(signal_name(64), "64");
    }

    #[test]
    fn events_as_lines_and_ndjson() {
        let batch = FileEvents {
            events: vec![
                FileEvent { kind: Kind::Create as i32, path: "/w/a".into(), ..Default::default() },
                FileEvent { kind: Kind::Create as i32, path: "/w/d".into(), is_dir: true, ..Default::default() },
                FileEvent { kind: Kind::Rename as i32, path: "/w/b".into(), from: "/w/a".into(), is_dir: false },
                FileEvent { kind: Kind::Remove as i32, path: "/w/b".into(), ..Default::default() },
            ],
            overflow: true,
        };
        assert_eq!(render_events(&batch, false), "create /w/a\ncreate /w/d/\nrename /w/b (from /w/a)\nremove /w/b\n");
        let lines: Vec<Value> = render_events(&batch, true).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], json!({ "overflow": true }));
        assert_eq!(lines[2], json!({ "kind": "CREATE", "path": "/w/d", "from": "", "is_dir": true }));
        assert_eq!(lines[3]["from"], "/w/a");
    }

    #[test]
    fn process_json_has_every_field() {
        assert_eq!(process_json(&ProcessInfo::default()).as_object().unwrap().len(), 10);
        let p = ProcessInfo {
            pid: 7,
            exit: Some(ExecResponse { exit_code: 5, ..Default::default() }),
            ..Default::default()
        };
        let v = process_json(&p);
        assert_eq!(v["pid"], 7);
        assert_eq!(v["exit"]["exit_code"], 5);
        assert_eq!(process_json(&ProcessInfo::default())["exit"], Value::Null);
    }
}
