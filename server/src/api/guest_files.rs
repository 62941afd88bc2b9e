//! Whole files in and out of a guest, for every front door (gRPC ReadFile
//! and WriteFile, E2B's `/files`): reads in agent-sized chunks from a task
//! of their own, and writes through the agent's staging file, so a file
//! appears whole or not at all. Both stop at MAX_FILE_BYTES.

use std::sync::Arc;
use std::time::Duration;

use forkd_agent_protocol::v1 as pb;
use tokio::sync::mpsc;

use crate::core::Error;
use crate::core::sandboxes::Sandbox;

/// Largest file moved through the files API.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// What one agent read or write carries.
pub const FILE_CHUNK: usize = 1 << 20;
/// How long one file operation may take in the guest.
pub const FILE_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The chunks of a guest file, in order, until its end or an error; the
/// reading stops when the receiver is dropped.
pub fn read_chunks(sb: Arc<Sandbox>, path: String) -> mpsc::Receiver<Result<Vec<u8>, Error>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut offset = 0u64;
        loop {
            let req = pb::ReadFileRequest { path: path.clone(), offset, length: FILE_CHUNK as u32 };
            match sb.agent.read_file(req, FILE_OP_TIMEOUT).await {
                Ok(d) => {
                    offset += d.data.len() as u64;
                    let eof = d.eof || d.data.is_empty() || offset > MAX_FILE_BYTES;
                    if !d.data.is_empty() && tx.send(Ok(d.data)).await.is_err() {
                        return;
                    }
                    if eof {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Error::from(e))).await;
                    return;
                }
            }
        }
    });
    rx
}

/// A file being written: chunks go to the agent's staging file, and
/// `finish` renames it onto the path.
pub struct Upload {
    sb: Arc<Sandbox>,
    path: String,
    id: String,
    mode: u32,
    offset: u64,
    pending: Vec<u8>,
    started: bool,
}

impl Upload {
    pub fn new(sb: Arc<Sandbox>, path: String, mode: u32) -> Upload {
        Upload { sb, path, id: crate::core::ids::nonce(), mode, offset: 0, pending: vec![], started: false }
    }

    async fn write(&mut self, last: bool) -> Result<(), Error> {
        let data = std::mem::take(&mut self.pending);
        let len = data.len() as u64;
        let req = pb::WriteFileRequest {
            path: self.path.clone(),
            offset: self.offset,
            data,
            first: !self.started,
            last,
            mode: self.mode,
            upload_id: self.id.clone(),
        };
        self.sb.agent.write_file(req, FILE_OP_TIMEOUT).await?;
        self.started = true;
        self.offset += len;
        Ok(())
    }

    /// Adds bytes; whole chunks go to the guest at once.
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), Error> {
        if self.offset + (self.pending.len() + chunk.len()) as u64 > MAX_FILE_BYTES {
            return Err(Error::ResourceExhausted(format!("{} exceeds the {MAX_FILE_BYTES}-byte limit", self.path)));
        }
        self.pending.extend_from_slice(chunk);
        while self.pending.len() >= FILE_CHUNK {
            let rest = self.pending.split_off(FILE_CHUNK);
            self.write(false).await?;
            self.pending = rest;
        }
        Ok(())
    }

    /// Writes the rest, puts the file in place and answers with its stat.
    pub async fn finish(mut self) -> Result<pb::FileStat, Error> {
        self.write(true).await?;
        Ok(self.sb.agent.stat(self.path.clone(), FILE_OP_TIMEOUT).await?)
    }
}
