//! A minimal QMP client: JSON commands over the control socket, skipping the
//! asynchronous events QEMU interleaves with replies.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::vmm::VmmError;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn ctl(msg: impl std::fmt::Display) -> VmmError {
    VmmError::Control(msg.to_string())
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU creates the socket) and
    /// negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, VmmError> {
        let stream = crate::vmm::connect_when_ready(path, timeout)
            .await
            .map_err(|e| ctl(format!("connect {}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(ctl(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.map_err(ctl)?;
        if n == 0 {
            return Err(VmmError::Exited("QMP connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| ctl(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(ctl)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(ctl)?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(ctl(format!("{cmd}: {}", err["desc"].as_str().unwrap_or("error"))));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The VM run state ("running", "paused", "inmigrate", ...).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or_default().to_string())
    }
}
