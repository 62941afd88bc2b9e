//! `exec`: run a command in a sandbox with its output streamed through.
//! `-i`/`-t` go to [`super::interactive`], `-d` to [`super::processes`].

use std::io::{ErrorKind, Write};

use forkd_api::v1::{ExecRequest, ExecResponse, exec_event::Event};

use crate::args::ExecArgs;
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, exec_exit_code};

pub async fn exec(conn: &Conn, args: ExecArgs, as_json: bool) -> anyhow::Result<u8> {
    if args.detach {
        return super::processes::start(conn, args, as_json).await;
    }
    if args.stdin || args.tty {
        return super::interactive::run(conn, args).await;
    }
    buffered(conn, args, Vec::new()).await
}

/// The command with `stdin` given up front (possibly empty), its output
/// streamed.
pub(super) async fn buffered(conn: &Conn, args: ExecArgs, stdin: Vec<u8>) -> anyhow::Result<u8> {
    let req = ExecRequest {
        id: args.id.to_string(),
        args: args.command,
        timeout_secs: args.timeout.unwrap_or(0),
        env: args.env.into_iter().collect(),
        cwd: args.cwd.unwrap_or_default(),
        stdin,
        // Streamed: no unary output cap applies.
        max_output_bytes: 0,
        ..Default::default()
    };
    // --timeout bounds the whole call here, output included, as gRPC
    // deadlines do.
    let run = stream(conn, req);
    let exit = match conn.deadline() {
        Some(d) => tokio::time::timeout(d, run).await.map_err(|_| conn.deadline_error(d))??,
        None => run.await?,
    };
    let code = exec_exit_code(exit.exit_code, exit.signal, exit.timed_out);
    Ok(u8::try_from(code).unwrap_or(FAILURE))
}

/// Copies output chunks to our stdout and stderr as they arrive and returns
/// the final status.
async fn stream(conn: &Conn, req: ExecRequest) -> anyhow::Result<ExecResponse> {
    let mut events = conn.sandboxes().exec_stream(req).await.map_err(|s| conn.status_error(&s))?.into_inner();
    let mut out = Sink::new(std::io::stdout());
    let mut err = Sink::new(std::io::stderr());
    loop {
        let Some(event) = events.message().await.map_err(|s| conn.status_error(&s))? else {
            return Err(CliError::new(FAILURE, "the daemon ended the output stream without an exit status").into());
        };
        match event.event {
            Some(Event::Stdout(data) | Event::Pty(data)) => out.write(&data)?,
            Some(Event::Stderr(data)) => err.write(&data)?,
            Some(Event::Exit(exit)) => {
                // The stream normally carries all output in chunks; the final
                // record's buffers are used only if no chunk came, so output
                // is never printed twice.
                if !out.wrote && !exit.stdout.is_empty() {
                    out.write(exit.stdout.as_bytes())?;
                }
                if !err.wrote && !exit.stderr.is_empty() {
                    err.write(exit.stderr.as_bytes())?;
                }
                return Ok(exit);
            }
            // Events of interactive exec and attach; one from a newer daemon
            // that this client does not know.
            Some(Event::Started(_) | Event::Dropped(_)) | None => {}
        }
    }
}

/// A local output that tolerates its reader going away (`| head`): the rest
/// of the output is dropped but the command still runs to its exit status.
pub(super) struct Sink<W: Write> {
    inner: W,
    closed: bool,
    wrote: bool,
}

impl<W: Write> Sink<W> {
    pub(super) fn new(inner: W) -> Self {
        Self { inner, closed: false, wrote: false }
    }

    pub(super) fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.wrote = true;
        if self.closed {
            return Ok(());
        }
        match self.inner.write_all(data).and_then(|()| self.inner.flush()) {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_reader_is_not_an_error() {
        let mut sink = Sink::new(Closed);
        sink.write(b"a").unwrap();
        sink.write(b"b").unwrap();
        assert!(sink.closed && sink.wrote);
    }

    #[test]
    fn sink_passes_bytes_through() {
        let mut sink = Sink::new(Vec::new());
        sink.write(b"a\xff").unwrap();
        sink.write(b"b").unwrap();
        assert_eq!(sink.inner, b"a\xffb");
    }
}
