//! Background processes: start_process, list_processes,
//! read_process_output, send_stdin, kill_process.
//!
//! A process outlives the call that started it; its output is kept by the
//! daemon (the last 1 MiB) and read in pieces by offset, so a model can poll
//! a server's log without holding a stream open.

use std::collections::HashMap;
use std::time::Duration;

use forkd_api::v1::exec_event::Event;
use forkd_api::v1::{
    AttachProcessRequest, ExecEvent, ExecResponse, ListProcessesRequest, ProcessInfo, PtySize, SendStdinRequest,
    SignalProcessRequest, StartProcessRequest,
};
use futures::{Stream, StreamExt};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::ForkdMcp;
use super::reply::{Answer, Reply, ToolError, deadline_error, unary};
use super::run::command_argv;
use super::sandboxes::SandboxParams;
use super::views;

/// Longest `wait_ms` accepted.
const MAX_WAIT_MS: u32 = 60_000;
/// Extra time allowed for the replay of buffered output to arrive once
/// `wait_ms` is over (it normally takes milliseconds).
const REPLAY_GRACE: Duration = Duration::from_secs(2);
/// Terminal size of a process started with `pty: true`.
const PTY_SIZE: PtySize = PtySize { rows: 24, cols: 80 };

/// A process of a sandbox: its pid, or the tag it was started with.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
#[schemars(inline)]
pub enum ProcessRef {
    Pid(u32),
    Name(String),
}

impl ProcessRef {
    fn selector(&self) -> String {
        match self {
            ProcessRef::Pid(pid) => pid.to_string(),
            ProcessRef::Name(name) => name.clone(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcessParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// The program and its arguments, run directly (no shell), e.g.
    /// ["python3", "-m", "http.server", "8000"]. Give this or `command`.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// A shell command line, run with `sh -c`, e.g. "python3 app.py > /tmp/app.log 2>&1".
    /// Give this or `args`.
    #[serde(default)]
    pub command: Option<String>,
    /// A name for the process, unique in the sandbox, to use instead of its pid
    /// in the other process tools: 1-64 of letters, digits, '.', '_' and '-',
    /// not all digits, e.g. "web".
    #[serde(default)]
    pub tag: Option<String>,
    /// Environment variables added for the process.
    #[serde(default)]
    pub env: HashMap<String, String>,
    /// Absolute working directory in the guest.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep standard input open for send_stdin (default false: stdin is empty).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a 24x80 pseudo-terminal (for interactive programs and REPLs);
    /// stdout and stderr then arrive together as stdout. Implies open stdin.
    #[serde(default)]
    pub pty: bool,
    /// Kill the process after this many seconds (default: no limit).
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

fn default_wait_ms() -> u32 {
    1000
}

fn default_max_bytes() -> u64 {
    64 * 1024
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadOutputParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// The process: its pid (e.g. 42) or the `tag` it was started with (e.g. "web").
    pub process: ProcessRef,
    /// Output byte offset to read from: 0 (default) for everything still kept
    /// (the last 1 MiB), or the `next_offset` of the previous answer for only
    /// what is new since.
    #[serde(default)]
    pub from_offset: u64,
    /// Milliseconds to wait for more output from a running process before
    /// answering (0-60000, default 1000). Already produced output is always
    /// returned; the call ends early when the process exits.
    #[serde(default = "default_wait_ms")]
    #[schemars(range(max = 60000))]
    pub wait_ms: u32,
    /// Most bytes of output returned (default 65536). When reached, `more` is
    /// true: call again with `next_offset`.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendStdinParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// The process: its pid (e.g. 42) or the `tag` it was started with. It must
    /// have been started with `stdin: true` or `pty: true`.
    pub process: ProcessRef,
    /// Text to write to its standard input, sent as is: end lines with "\n"
    /// (at most 1 MiB per call).
    #[serde(default)]
    pub data: String,
    /// Close standard input after the data (the program sees end of file).
    #[serde(default)]
    pub close: bool,
}

fn default_signal() -> String {
    "KILL".into()
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillProcessParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// The process: its pid (e.g. 42) or the `tag` it was started with (e.g. "web").
    pub process: ProcessRef,
    /// Signal, by name or number: "KILL" (default, cannot be caught), "TERM"
    /// (asks it to exit), "INT" (like Ctrl-C), "HUP", "9", ...
    #[serde(default = "default_signal")]
    pub signal: String,
}

/// What one read of a process's output gathered.
#[derive(Debug, Default, PartialEq)]
struct Collected {
    started: Option<ProcessInfo>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Bytes that were no longer kept when the read began.
    dropped: u64,
    /// Offset just past the last byte returned.
    next_offset: u64,
    exit: Option<ExecResponse>,
    /// `max_bytes` was reached: more output may be waiting.
    more: bool,
}

impl Collected {
    /// Keeps what fits of one chunk; offsets stay exact even when a chunk
    /// is cut, so the next read starts at the first byte not returned.
    fn take(&mut self, data: &[u8], stderr: bool, max_bytes: u64) {
        let used = (self.stdout.len() + self.stderr.len()) as u64;
        let room = max_bytes.saturating_sub(used);
        let n = (data.len() as u64).min(room) as usize;
        let out = if stderr { &mut self.stderr } else { &mut self.stdout };
        out.extend_from_slice(&data[..n]);
        self.next_offset += n as u64;
        if n < data.len() {
            self.more = true;
        }
    }
}

/// Reads attach events until the process exits, `max_bytes` is reached, or
/// `wait` is over and the buffered output (up to the `output_bytes` of the
/// first event) has been replayed.
async fn collect<S>(mut events: S, from_offset: u64, wait: Duration, max_bytes: u64) -> Result<Collected, tonic::Status>
where
    S: Stream<Item = Result<ExecEvent, tonic::Status>> + Unpin,
{
    let deadline = Instant::now() + wait;
    let mut c = Collected { next_offset: from_offset, ..Default::default() };
    let mut replayed_up_to: Option<u64> = None;
    while !c.more {
        let replay_done = replayed_up_to.is_some_and(|end| c.next_offset >= end);
        let until = if replay_done { deadline } else { deadline + REPLAY_GRACE };
        let event = match tokio::time::timeout_at(until, events.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(event)) => event?,
        };
        match event.event {
            Some(Event::Started(info)) => {
                replayed_up_to = Some(info.output_bytes);
                c.started = Some(info);
            }
            Some(Event::Dropped(n)) => {
                c.dropped += n;
                c.next_offset += n;
            }
            Some(Event::Stdout(data) | Event::Pty(data)) => c.take(&data, false, max_bytes),
            Some(Event::Stderr(data)) => c.take(&data, true, max_bytes),
            Some(Event::Exit(exit)) => {
                c.exit = Some(exit);
                break;
            }
            None => {}
        }
    }
    Ok(c)
}

#[tool_router(router = process_tools, vis = "pub(super)")]
impl ForkdMcp {
    #[tool(description = "Start a program in the background in a sandbox (a server, a build, a \
        training run) and return at once. It keeps running after this call; its output is kept \
        (the last 1 MiB) for read_process_output. Give `args` (argv) or `command` (shell string) \
        and preferably a `tag` to refer to it. Answers the process: {pid, tag, args, running, \
        output_bytes, exit}. Use send_stdin to type into it, kill_process to stop it.")]
    async fn start_process(&self, Parameters(p): Parameters<StartProcessParams>) -> Reply {
        let args = command_argv(p.args, p.command)?;
        let req = StartProcessRequest {
            id: p.sandbox_id,
            args,
            env: p.env,
            cwd: p.cwd.unwrap_or_default(),
            tag: p.tag.unwrap_or_default(),
            pty: p.pty.then_some(PTY_SIZE),
            stdin: p.stdin,
            timeout_secs: p.timeout_secs.unwrap_or(0),
            ..Default::default()
        };
        let info = unary(&self.conn, self.conn.sandboxes().start_process(req)).await?;
        Ok(Answer(views::process(&info)))
    }

    #[tool(
        description = "List the background processes of a sandbox (started with start_process), \
            running and recently exited (exit statuses are kept 10 minutes). Answers \
            {\"processes\": [{pid, tag, args, running, output_bytes, exit}]}.",
        annotations(read_only_hint = true)
    )]
    async fn list_processes(&self, Parameters(p): Parameters<SandboxParams>) -> Reply {
        let req = ListProcessesRequest { id: p.sandbox_id };
        let resp = unary(&self.conn, self.conn.sandboxes().list_processes(req)).await?;
        let processes: Vec<_> = resp.processes.iter().map(views::process).collect();
        Ok(Answer(json!({ "processes": processes })))
    }

    #[tool(
        description = "Read a background process's output from a byte offset. Returns what is \
            already there and, for a running process, what arrives within `wait_ms` (default \
            1000 ms). Answers {stdout, stderr, next_offset, more, running, exit, dropped_bytes, \
            process}. To follow the output, call again with from_offset = next_offset; `more` true \
            means max_bytes was reached and more is waiting. `exit` is set once it has ended \
            ({exit_code, signal, timed_out}); dropped_bytes counts old output no longer kept.",
        annotations(read_only_hint = true)
    )]
    async fn read_process_output(&self, Parameters(p): Parameters<ReadOutputParams>) -> Reply {
        if p.wait_ms > MAX_WAIT_MS {
            return Err(ToolError::invalid(format!("wait_ms must be at most {MAX_WAIT_MS}, not {}", p.wait_ms)));
        }
        if p.max_bytes == 0 {
            return Err(ToolError::invalid("max_bytes must be at least 1"));
        }
        let req = AttachProcessRequest { id: p.sandbox_id, process: p.process.selector(), from_offset: p.from_offset };
        let wait = Duration::from_millis(u64::from(p.wait_ms));
        let conn = &self.conn;
        let read = async {
            let events = conn.sandboxes().attach_process(req).await?.into_inner();
            collect(events, p.from_offset, wait, p.max_bytes).await
        };
        // The CLI's --timeout bounds this call like any other.
        let collected = match conn.deadline() {
            Some(d) => tokio::time::timeout(d, read).await.map_err(|_| deadline_error(conn, d))?,
            None => read.await,
        }
        .map_err(|s| ToolError::from_status(&s, &conn.url))?;

        let mut process = collected.started.clone().unwrap_or_default();
        if let Some(exit) = &collected.exit {
            process.running = false;
            process.exit = Some(exit.clone());
        }
        Ok(Answer(json!({
            "stdout": String::from_utf8_lossy(&collected.stdout),
            "stderr": String::from_utf8_lossy(&collected.stderr),
            "next_offset": collected.next_offset,
            "more": collected.more,
            "running": process.running,
            "exit": views::process(&process)["exit"],
            "dropped_bytes": collected.dropped,
            "process": views::process(&process),
        })))
    }

    #[tool(description = "Write text to the standard input of a background process (started \
        with stdin: true or pty: true), e.g. a line for a REPL: \"print(1)\\n\". `close: true` \
        ends its input afterwards. Answers the process; read its reaction with \
        read_process_output.")]
    async fn send_stdin(&self, Parameters(p): Parameters<SendStdinParams>) -> Reply {
        if p.data.is_empty() && !p.close {
            return Err(ToolError::invalid("nothing to do: give `data`, or `close: true`"));
        }
        let req = SendStdinRequest {
            id: p.sandbox_id,
            process: p.process.selector(),
            data: p.data.into_bytes(),
            close: p.close,
        };
        let info = unary(&self.conn, self.conn.sandboxes().send_stdin(req)).await?;
        Ok(Answer(views::process(&info)))
    }

    #[tool(
        description = "Send a signal to a background process (and its process group): by default \
            KILL, which ends it at once; \"TERM\" asks it to exit, \"INT\" is Ctrl-C. Answers the \
            process; it may take a moment to show running: false (see read_process_output).",
        annotations(destructive_hint = true)
    )]
    async fn kill_process(&self, Parameters(p): Parameters<KillProcessParams>) -> Reply {
        let req = SignalProcessRequest { id: p.sandbox_id, process: p.process.selector(), signal: p.signal };
        let info = unary(&self.conn, self.conn.sandboxes().signal_process(req)).await?;
        Ok(Answer(views::process(&info)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Event) -> Result<ExecEvent, tonic::Status> {
        Ok(ExecEvent { event: Some(event) })
    }

    fn started(output_bytes: u64) -> Event {
        Event::Started(ProcessInfo { pid: 7, running: true, output_bytes, ..Default::default() })
    }

    #[tokio::test]
    async fn an_exited_process_is_read_to_its_exit() {
        let events = futures::stream::iter(vec![
            ev(started(9)),
            ev(Event::Stdout(b"hello\n".to_vec())),
            ev(Event::Stderr(b"err".to_vec())),
            ev(Event::Exit(ExecResponse { exit_code: 3, ..Default::default() })),
        ]);
        let c = collect(events, 0, Duration::from_secs(1), 1024).await.unwrap();
        assert_eq!((c.stdout.as_slice(), c.stderr.as_slice()), (&b"hello\n"[..], &b"err"[..]));
        assert_eq!(c.next_offset, 9);
        assert_eq!(c.exit.unwrap().exit_code, 3);
        assert!(!c.more);
    }

    #[tokio::test]
    async fn a_running_process_answers_after_the_wait() {
        // The replay, then nothing more: the stream stays open (live follow).
        let events =
            futures::stream::iter(vec![ev(started(14)), ev(Event::Dropped(10)), ev(Event::Stdout(b"tail".to_vec()))])
                .chain(futures::stream::pending());
        let begun = Instant::now();
        let c = collect(Box::pin(events), 0, Duration::from_millis(300), 1024).await.unwrap();
        let took = begun.elapsed();
        assert!(took >= Duration::from_millis(300) && took < REPLAY_GRACE, "{took:?}");
        assert_eq!((c.dropped, c.next_offset), (10, 14));
        assert_eq!(c.stdout, b"tail");
        assert!(c.exit.is_none() && !c.more);
    }

    #[tokio::test]
    async fn the_replay_is_waited_for_even_with_no_wait() {
        // wait 0: the buffered bytes (output_bytes 6) still come back.
        let events = futures::stream::iter(vec![ev(started(6))])
            .chain(futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ev(Event::Stdout(b"abcdef".to_vec()))
            }))
            .chain(futures::stream::pending());
        let c = collect(Box::pin(events), 0, Duration::ZERO, 1024).await.unwrap();
        assert_eq!(c.stdout, b"abcdef");
        assert_eq!(c.next_offset, 6);
    }

    #[tokio::test]
    async fn max_bytes_cuts_exactly_and_says_more() {
        let events = futures::stream::iter(vec![
            ev(started(10)),
            ev(Event::Stdout(b"0123".to_vec())),
            ev(Event::Stderr(b"456789".to_vec())),
        ])
        .chain(futures::stream::pending());
        let c = collect(Box::pin(events), 100, Duration::from_secs(5), 6).await.unwrap();
        assert_eq!((c.stdout.as_slice(), c.stderr.as_slice()), (&b"0123"[..], &b"45"[..]));
        assert_eq!(c.next_offset, 106);
        assert!(c.more);
    }

    #[tokio::test]
    async fn a_failed_stream_is_an_error() {
        let events = futures::stream::iter(vec![ev(started(0)), Err(tonic::Status::not_found("no process \"x\""))]);
        let err = collect(events, 0, Duration::from_secs(1), 10).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[test]
    fn processes_are_pids_or_tags() {
        let p: KillProcessParams = serde_json::from_value(json!({"sandbox_id": "sb-a", "process": 42})).unwrap();
        assert_eq!((p.process.selector().as_str(), p.signal.as_str()), ("42", "KILL"));
        let p: KillProcessParams = serde_json::from_value(json!({"sandbox_id": "sb-a", "process": "web"})).unwrap();
        assert_eq!(p.process.selector(), "web");
    }
}
