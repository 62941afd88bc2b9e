//! A minimal QMP client: JSON commands over the control socket, skipping the
//! asynchronous events QEMU interleaves with replies.
//!
//! QEMU runs the guest and may be compromised, so nothing it sends is
//! trusted: every command carries an `id` and only the reply echoing that id
//! answers it (a late reply to a command that timed out is skipped, never
//! taken for the next command's); a line longer than [`MAX_LINE`] fails the
//! connection instead of growing a buffer; every exchange, the greeting and
//! capabilities negotiation included, has a deadline ([`TIMEOUT`] unless told
//! otherwise).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::vmm::VmmError;

/// Longest line accepted from QEMU; real replies are a few KiB at most.
pub const MAX_LINE: usize = 1 << 20;
/// Deadline of one command (write, then wait for its reply), and of the
/// greeting plus capabilities negotiation.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest error text kept from a QEMU `desc`.
const MAX_DESC: usize = 512;

/// What went wrong on the QMP connection.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QmpError {
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("bad QMP message: {0}")]
    Malformed(String),
    #[error("unexpected QMP greeting")]
    Greeting,
    #[error("QMP connection unusable after an earlier error: {0}")]
    Broken(String),
}

impl From<QmpError> for VmmError {
    fn from(e: QmpError) -> Self {
        match e {
            QmpError::Closed => VmmError::Exited(e.to_string()),
            e => VmmError::Control(e.to_string()),
        }
    }
}

/// One line from QEMU, classified.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, the first line on a connection.
    Greeting,
    /// An asynchronous event: not an answer to anything.
    Event,
    /// An answer to the command with this `id` (None if it carried none or
    /// one this client never sends): its `return` value or `error` text.
    Reply { id: Option<u64>, result: Result<Value, String> },
}

/// Parses one line (without its newline). Pure, so it can be fuzzed.
pub fn parse_line(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| QmpError::Malformed(e.to_string()))?;
    let Value::Object(mut obj) = v else {
        return Err(QmpError::Malformed("not a JSON object".into()));
    };
    if obj.contains_key("event") {
        return Ok(Message::Event);
    }
    if obj.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(err) = obj.get("error") {
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("error");
        return Ok(Message::Reply { id, result: Err(truncate(desc, MAX_DESC).to_string()) });
    }
    match obj.remove("return") {
        Some(ret) => Ok(Message::Reply { id, result: Ok(ret) }),
        None => Err(QmpError::Malformed("neither return, error nor event".into())),
    }
}

/// The reply `line` gives to the command `want`, if it is that reply.
/// Events, greetings and replies to other ids are `Ok(None)`: skipped.
pub fn reply_to(line: &[u8], want: u64) -> Result<Option<Result<Value, String>>, QmpError> {
    Ok(match parse_line(line)? {
        Message::Reply { id: Some(id), result } if id == want => Some(result),
        _ => None,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads one line of at most `max` bytes into `partial` and returns it
/// without its newline. Cancel-safe: bytes read before a cancellation (a
/// deadline) stay in `partial` for the next call, so the stream stays in
/// step with line boundaries.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    partial: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, QmpError> {
    loop {
        let buf = r.fill_buf().await.map_err(|_| QmpError::Closed)?;
        if buf.is_empty() {
            return Err(QmpError::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if partial.len() + take > max {
            return Err(QmpError::LineTooLong);
        }
        partial.extend_from_slice(&buf[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(std::mem::take(partial));
        }
    }
}

pub struct Qmp {
    io: Conn<BufReader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf>,
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU creates the socket) and
    /// negotiates capabilities within [`TIMEOUT`].
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, VmmError> {
        let stream = crate::vmm::connect_when_ready(path, timeout)
            .await
            .map_err(|e| VmmError::Control(format!("connect {}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut io = Conn::new(BufReader::new(r), w);
        io.handshake(TIMEOUT).await?;
        Ok(Qmp { io })
    }

    /// Runs one command within [`TIMEOUT`] and returns its `return` value.
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        self.io.execute_within(cmd, args, TIMEOUT).await
    }

    /// Runs one command within `timeout`, for the rare command that may
    /// legitimately take longer (or should fail sooner) than [`TIMEOUT`].
    pub async fn execute_within(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        self.io.execute_within(cmd, args, timeout).await
    }

    /// The VM run state ("running", "paused", "inmigrate", ...).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or_default().to_string())
    }
}

/// The protocol over any byte stream (a Unix socket in use, an in-memory
/// pipe in tests).
pub struct Conn<R, W> {
    reader: R,
    writer: W,
    /// The current line so far, kept across a deadline.
    partial: Vec<u8>,
    next_id: u64,
    /// Set once the stream can no longer be trusted to be in step.
    broken: Option<String>,
}

impl<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    pub fn new(reader: R, writer: W) -> Self {
        // Ids start at a random point so a reply meant for another
        // connection's command never matches one of ours.
        Self { reader, writer, partial: Vec::new(), next_id: rand::random::<u32>() as u64, broken: None }
    }

    /// Reads the greeting and negotiates capabilities, all within `timeout`.
    pub async fn handshake(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let greeting = tokio::time::timeout_at(deadline, self.next_line())
            .await
            .map_err(|_| VmmError::Timeout("QMP greeting".into()))??;
        if parse_line(&greeting)? != Message::Greeting {
            return Err(QmpError::Greeting.into());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.execute_within("qmp_capabilities", None, left).await.map(|_| ())
    }

    async fn next_line(&mut self) -> Result<Vec<u8>, QmpError> {
        if let Some(why) = &self.broken {
            return Err(QmpError::Broken(why.clone()));
        }
        let r = read_line(&mut self.reader, &mut self.partial, MAX_LINE).await;
        if let Err(e) = &r {
            // Past a closed stream or an overlong line there is no line
            // boundary to resume from.
            self.broken = Some(e.to_string());
            self.partial = Vec::new();
        }
        r
    }

    /// Runs one command; fails with `Timeout` if its reply has not come
    /// within `timeout`. A reply arriving later is skipped by its id.
    pub async fn execute_within(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| VmmError::Control(e.to_string()))?;
        bytes.push(b'\n');
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || VmmError::Timeout(format!("QMP {cmd}"));
        if self.broken.is_none() {
            match tokio::time::timeout_at(deadline, self.writer.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                // Part of the command may have gone out: whatever is sent
                // next would be parsed together with it.
                Ok(Err(e)) => {
                    self.broken = Some(format!("writing {cmd}: {e}"));
                    return Err(VmmError::Control(format!("{cmd}: {e}")));
                }
                Err(_) => {
                    self.broken = Some(format!("writing {cmd} timed out"));
                    return Err(timed_out());
                }
            }
        }
        let reply = async {
            loop {
                let line = self.next_line().await?;
                match reply_to(&line, id) {
                    Ok(None) => continue,
                    Ok(Some(Ok(ret))) => return Ok(ret),
                    Ok(Some(Err(desc))) => return Err(VmmError::Control(format!("{cmd}: {desc}"))),
                    Err(e) => return Err(VmmError::Control(format!("{cmd}: {e}"))),
                }
            }
        };
        tokio::time::timeout_at(deadline, reply).await.map_err(|_| timed_out())?
    }
}

#[cfg(test)]
mod tests;
