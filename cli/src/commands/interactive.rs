//! `exec -i` and `exec -t`: a command whose stdin is streamed from this
//! process, optionally on a pseudo-terminal the size of ours.
//!
//! With `-it` the local terminal is put in raw mode, so every byte typed
//! (Ctrl-C, Ctrl-D, Ctrl-Z included) reaches the guest's terminal line
//! discipline and the guest decides what it means; the terminal is restored
//! on every way out (the command's exit, an error, a signal to forkd).
//! Window-size changes follow the local terminal (SIGWINCH).
//!
//! Signals sent to forkd itself (it gets none from the keyboard in raw
//! mode): INT and QUIT are passed on to the command's process group; TERM
//! and HUP end the session — a command on a terminal gets HUP, as when an
//! ssh connection drops, any other the same signal — and forkd exits with
//! the command's status if it ends within a moment, else 128+N.
//!
//! The command is a process of the sandbox: when the connection is lost it
//! keeps running, and `forkd attach` follows it.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::time::Duration;

use forkd_api::v1::{
    ExecEvent, ExecInput, ExecRequest, ExecResponse, ListProcessesRequest, PtySize, exec_event::Event,
    exec_input::Input,
};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::exec::Sink;
use crate::args::ExecArgs;
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, USAGE, exec_exit_code};

/// Terminal size used when no terminal tells us one.
pub(super) const DEFAULT_SIZE: PtySize = PtySize { rows: 24, cols: 80 };
/// Largest side the daemon accepts.
const MAX_SIDE: u32 = 1000;
/// How long forkd waits for the command to end after passing on TERM or
/// HUP before it leaves anyway.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// Read size for stdin: one keystroke in raw mode, up to this when piped.
const STDIN_CHUNK: usize = 32 * 1024;

/// Runs `exec` with `-i` and/or `-t`.
pub async fn run(conn: &Conn, args: ExecArgs) -> anyhow::Result<u8> {
    let stdin_is_tty = std::io::stdin().is_terminal();
    if args.tty && args.stdin && !stdin_is_tty {
        return Err(CliError::new(
            USAGE,
            "-it needs stdin to be a terminal; use -i without -t to pipe input into the command",
        )
        .into());
    }
    let pty = args.tty.then(|| local_size().unwrap_or(DEFAULT_SIZE));
    let mut env: std::collections::HashMap<String, String> = args.env.iter().cloned().collect();
    if args.tty && !env.contains_key("TERM") {
        // As ssh does: the remote side draws for the terminal we have.
        if let Some(term) = std::env::var("TERM").ok().filter(|t| !t.is_empty()) {
            env.insert("TERM".into(), term);
        }
    }
    let start = ExecRequest {
        id: args.id.to_string(),
        args: args.command.clone(),
        timeout_secs: args.timeout.unwrap_or(0),
        env,
        cwd: args.cwd.clone().unwrap_or_default(),
        pty,
        tag: args.tag.clone().unwrap_or_default(),
        ..Default::default()
    };

    let input = args.stdin.then(spawn_stdin_reader);
    let (tx, rx) = mpsc::channel::<ExecInput>(32);
    tx.send(ExecInput { input: Some(Input::Start(start)) }).await.ok();
    let events = match conn.sandboxes().exec_interactive(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        // A daemon from before interactive exec: piped stdin still works
        // the old way, read to its end and sent with the command.
        Err(s) if s.code() == tonic::Code::Unimplemented && !args.tty => {
            let stdin = match input {
                Some(rx) => drain(rx).await,
                None => Vec::new(),
            };
            return super::exec::buffered(conn, args, stdin).await;
        }
        Err(s) => return Err(conn.status_error(&s).into()),
    };

    // Raw mode only once the command is on its way, and restored when
    // `raw` is dropped, whatever the session ends with.
    let raw = if args.tty && args.stdin { Some(RawMode::enable()?) } else { None };
    if !args.stdin {
        // -t alone: the command reads end-of-file from its terminal rather
        // than waiting for input that never comes.
        tx.send(ExecInput { input: Some(Input::Eof(true)) }).await.ok();
    }
    let session = Session { conn, id: args.id.to_string(), pty: args.tty, tx, pid: 0 };
    let run = session.run(events, input);
    let ended = match conn.deadline() {
        Some(d) => tokio::time::timeout(d, run).await.unwrap_or_else(|_| Err(conn.deadline_error(d).into())),
        None => run.await,
    };
    if let (Some(raw), Err(_)) = (raw, &ended) {
        drop(raw);
        // The error goes on a line of its own, not after the guest's prompt.
        eprintln!();
    }
    let exit = ended?;
    let code = match exit {
        Ended::Exit(x) => exec_exit_code(x.exit_code, x.signal, x.timed_out),
        Ended::Left(signal) => 128 + signal,
    };
    Ok(u8::try_from(code).unwrap_or(FAILURE))
}

enum Ended {
    /// The command exited.
    Exit(ExecResponse),
    /// forkd left on this signal before the command ended.
    Left(i32),
}

/// What a session needs besides its streams.
struct Session<'a> {
    conn: &'a Conn,
    id: String,
    pty: bool,
    tx: mpsc::Sender<ExecInput>,
    /// The command's pid once `started` came.
    pid: u32,
}

impl Session<'_> {
    async fn run(
        mut self,
        mut events: tonic::Streaming<ExecEvent>,
        mut input: Option<mpsc::Receiver<Option<Vec<u8>>>>,
    ) -> anyhow::Result<Ended> {
        let mut signals = Signals::new(self.pty)?;
        let mut out = Sink::new(std::io::stdout());
        let mut err = Sink::new(std::io::stderr());
        // Set once TERM or HUP was passed on: when to stop waiting.
        let mut leaving: Option<(tokio::time::Instant, i32)> = None;
        loop {
            let until = leaving;
            let give_up = async move {
                match until {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = events.message() => {
                    let event = match msg {
                        Ok(Some(e)) => e,
                        Ok(None) => return self.lost(None).await,
                        Err(s) => return self.lost(Some(s)).await,
                    };
                    match event.event {
                        Some(Event::Started(p)) => self.pid = p.pid,
                        Some(Event::Pty(data) | Event::Stdout(data)) => out.write(&data)?,
                        Some(Event::Stderr(data)) => err.write(&data)?,
                        Some(Event::Exit(x)) => return Ok(Ended::Exit(x)),
                        Some(Event::Dropped(_)) | None => {}
                    }
                }
                chunk = recv_input(&mut input) => match chunk {
                    Some(data) => self.send(Input::Stdin(data)).await,
                    None => {
                        // End of our stdin: the command's stdin ends too (a
                        // terminal gets its end-of-file character).
                        input = None;
                        self.send(Input::Eof(true)).await;
                    }
                },
                Some(()) = recv_signal(&mut signals.winch) => {
                    if let Some(size) = local_size() {
                        self.send(Input::Resize(size)).await;
                    }
                }
                Some(()) = recv_signal(&mut signals.int) => self.send(Input::Signal("INT".into())).await,
                Some(()) = recv_signal(&mut signals.quit) => self.send(Input::Signal("QUIT".into())).await,
                Some(()) = recv_signal(&mut signals.term), if leaving.is_none() => {
                    leaving = Some(self.hang_up("TERM", libc::SIGTERM).await);
                }
                Some(()) = recv_signal(&mut signals.hup), if leaving.is_none() => {
                    leaving = Some(self.hang_up("HUP", libc::SIGHUP).await);
                }
                () = give_up => return Ok(Ended::Left(leaving.map_or(libc::SIGTERM, |(_, s)| s))),
            }
        }
    }

    /// Passes a TERM or HUP on (HUP for a terminal, whose shell would ignore
    /// TERM) and returns when to stop waiting for the command.
    async fn hang_up(&self, name: &str, signal: i32) -> (tokio::time::Instant, i32) {
        let sent = if self.pty { "HUP" } else { name };
        self.send(Input::Signal(sent.into())).await;
        (tokio::time::Instant::now() + HANGUP_GRACE, signal)
    }

    /// Queues one input message. Failing means the call is over, which the
    /// event stream reports.
    async fn send(&self, input: Input) {
        let _ = self.tx.send(ExecInput { input: Some(input) }).await;
    }

    /// The stream ended without an exit event (`status` says why, if it
    /// failed). When the command had started, its exit may still be known:
    /// the daemon keeps a finished process listed for a while.
    async fn lost(&self, status: Option<tonic::Status>) -> anyhow::Result<Ended> {
        let err: anyhow::Error = match &status {
            Some(s) => self.conn.status_error(s).into(),
            None => CliError::new(FAILURE, "the daemon ended the output stream without an exit status").into(),
        };
        if self.pid == 0 {
            return Err(err);
        }
        let req = ListProcessesRequest { id: self.id.clone() };
        let listed = self.conn.call(self.conn.sandboxes().list_processes(req)).await;
        let found = listed.ok().and_then(|l| l.processes.into_iter().find(|p| p.pid == self.pid));
        match found {
            Some(p) if !p.running && p.exit.is_some() => Ok(Ended::Exit(p.exit.unwrap_or_default())),
            Some(p) if p.running => Err(err.context(format!(
                "process {} is still running in {} (`forkd attach {} {}` follows it)",
                self.pid, self.id, self.id, self.pid
            ))),
            _ => Err(err),
        }
    }
}

/// Signals forkd handles during a session.
struct Signals {
    int: Option<Signal>,
    quit: Option<Signal>,
    term: Option<Signal>,
    hup: Option<Signal>,
    winch: Option<Signal>,
}

impl Signals {
    fn new(pty: bool) -> std::io::Result<Self> {
        Ok(Self {
            int: Some(signal(SignalKind::interrupt())?),
            quit: Some(signal(SignalKind::quit())?),
            term: Some(signal(SignalKind::terminate())?),
            hup: Some(signal(SignalKind::hangup())?),
            winch: if pty { Some(signal(SignalKind::window_change())?) } else { None },
        })
    }
}

/// The next delivery of a signal; never, for one not handled.
async fn recv_signal(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The next piece of stdin (`None` at its end); never, when stdin is not
/// forwarded or has ended.
async fn recv_input(rx: &mut Option<mpsc::Receiver<Option<Vec<u8>>>>) -> Option<Vec<u8>> {
    match rx {
        // A reader that went away without saying so ended too.
        Some(rx) => rx.recv().await.flatten(),
        None => std::future::pending().await,
    }
}

/// Reads stdin on a thread of its own (a blocking read would hold up the
/// runtime's shutdown), sending each piece as it arrives and `None` at the
/// end. The thread ends with the process or when nobody listens.
fn spawn_stdin_reader() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    let reader = move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            let piece = match stdin.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO from a terminal that went away: the input is over.
                Err(_) => None,
            };
            let end = piece.is_none();
            if tx.blocking_send(piece).is_err() || end {
                return;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("stdin".into()).spawn(reader) {
        // Without the thread the command just gets no input.
        eprintln!("forkd: cannot read stdin: {e}");
    }
    rx
}

/// Everything the reader sends until the end.
async fn drain(mut rx: mpsc::Receiver<Option<Vec<u8>>>) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(Some(piece)) = rx.recv().await {
        all.extend_from_slice(&piece);
    }
    all
}

/// The size of the terminal on stdin, stdout or stderr, the first that is one.
pub(super) fn local_size() -> Option<PtySize> {
    [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO].into_iter().find_map(|fd| {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize into the struct passed.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        (rc == 0).then(|| clamp_size(ws.ws_row, ws.ws_col)).flatten()
    })
}

/// A size the daemon accepts; `None` for a terminal that reports 0.
fn clamp_size(rows: u16, cols: u16) -> Option<PtySize> {
    if rows == 0 || cols == 0 {
        return None;
    }
    Some(PtySize { rows: u32::from(rows).min(MAX_SIDE), cols: u32::from(cols).min(MAX_SIDE) })
}

/// The local terminal in raw mode for as long as this lives.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable() -> Result<Self, CliError> {
        let stdin = std::io::stdin();
        let fail = |e: nix::Error| CliError::new(FAILURE, format!("cannot put the terminal in raw mode: {e}"));
        let saved = termios::tcgetattr(stdin.as_fd()).map_err(fail)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(fail)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_clamped_to_what_the_daemon_takes() {
        assert_eq!(clamp_size(30, 100), Some(PtySize { rows: 30, cols: 100 }));
        assert_eq!(clamp_size(2000, 5000), Some(PtySize { rows: 1000, cols: 1000 }));
        assert_eq!(clamp_size(0, 80), None);
        assert_eq!(clamp_size(24, 0), None);
    }

    #[tokio::test]
    async fn a_reader_that_ended_ends_the_input() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Some(b"ab".to_vec())).await.unwrap();
        tx.send(Some(b"c".to_vec())).await.unwrap();
        drop(tx);
        assert_eq!(drain(rx).await, b"abc");
        let mut none: Option<mpsc::Receiver<Option<Vec<u8>>>> = None;
        let pending = tokio::time::timeout(Duration::from_millis(10), recv_input(&mut none)).await;
        assert!(pending.is_err(), "no input never yields");
    }
}
