//! Guest files: read_file, write_file, list_files, and wait_for_text
//! (poll a file until a marker shows up in it).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use forkd_api::v1::{GetSandboxRequest, ListFilesRequest, ReadFileRequest, WriteFileRequest};
use futures::StreamExt;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use tonic::Code;

use super::ForkdMcp;
use super::reply::{Answer, Reply, ToolError, code_name, deadline_error, unary};
use super::views;

/// How often wait_for_text reads the file.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Longest wait_for_text timeout.
const MAX_WAIT_SECS: u32 = 3600;
/// Bytes per message when writing a file.
const WRITE_CHUNK: usize = 256 * 1024;
/// How much of the file's end a timed-out wait_for_text shows.
const TAIL_BYTES: usize = 2000;
/// Longest matching line wait_for_text shows.
const MAX_LINE: usize = 500;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum Encoding {
    /// Text (UTF-8).
    #[default]
    Utf8,
    /// Base64 of the raw bytes, for binary files.
    Base64,
}

fn default_max_bytes() -> u64 {
    64 * 1024
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// Absolute path of the file in the guest, e.g. "/tmp/out.txt".
    pub path: String,
    /// Byte offset to start reading at (default 0). To page through a large
    /// file, pass the previous answer's `next_offset`.
    #[serde(default)]
    pub offset: u64,
    /// Most bytes returned (default 65536).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// "utf8" (default): the content as text; "base64": the raw bytes in base64.
    #[serde(default)]
    pub encoding: Encoding,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// Absolute path of the file in the guest, e.g. "/tmp/script.py". An
    /// existing file is replaced.
    pub path: String,
    /// The whole new content of the file (text, or base64 with encoding "base64").
    pub content: String,
    /// "utf8" (default): `content` is the text; "base64": `content` is base64
    /// of the bytes to write.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits in octal, e.g. "755" for an executable script
    /// (default: the daemon's, 0644).
    #[serde(default)]
    pub mode: Option<String>,
}

fn root() -> String {
    "/".into()
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// Absolute path of a directory in the guest (default "/").
    #[serde(default = "root")]
    pub path: String,
}

fn default_wait_secs() -> u32 {
    60
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitForTextParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// Absolute path of the file to watch, e.g. "/tmp/server.log". It need not
    /// exist yet.
    pub path: String,
    /// The text to wait for (exact, case-sensitive substring), e.g. "Listening on".
    pub text: String,
    /// Seconds to wait before giving up with DEADLINE_EXCEEDED (default 60,
    /// at most 3600).
    #[serde(default = "default_wait_secs")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_secs: u32,
}

/// Splits off a multi-byte character cut at the end of `bytes`, so text
/// pages end on a character boundary.
fn whole_chars(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // Incomplete at the very end: return up to it; the rest comes next time.
        Err(e) if e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4 => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

/// The lines of `content` holding `text` (at most a few, each clipped).
fn matching_lines(content: &str, text: &str) -> Vec<String> {
    content
        .lines()
        .filter(|l| l.contains(text))
        .take(5)
        .map(|l| {
            if l.len() <= MAX_LINE {
                return l.to_string();
            }
            let mut cut = MAX_LINE;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}…", &l[..cut])
        })
        .collect()
}

impl ForkdMcp {
    /// Streams a guest file: bytes from `offset`, at most `max` of them, and
    /// whether more followed.
    async fn read_guest_file(&self, id: &str, path: &str, offset: u64, max: u64) -> Result<(Vec<u8>, bool), ToolError> {
        let conn = &self.conn;
        let err = |s: tonic::Status| ToolError::from_status(&s, &conn.url);
        let req = ReadFileRequest { id: id.to_string(), path: path.to_string() };
        let read = async {
            let mut chunks = conn.sandboxes().read_file(req).await.map_err(err)?.into_inner();
            let mut skip = offset;
            let mut out = Vec::new();
            while let Some(chunk) = chunks.next().await {
                let data = chunk.map_err(err)?.data;
                let cut = (skip.min(data.len() as u64)) as usize;
                skip -= cut as u64;
                out.extend_from_slice(&data[cut..]);
                if out.len() as u64 > max {
                    out.truncate(max as usize);
                    return Ok((out, true));
                }
            }
            Ok((out, false))
        };
        match conn.deadline() {
            Some(d) => tokio::time::timeout(d, read).await.map_err(|_| deadline_error(conn, d))?,
            None => read.await,
        }
    }
}

#[tool_router(router = file_tools, vis = "pub(super)")]
impl ForkdMcp {
    #[tool(
        description = "Read a file in a sandbox. Answers {path, content, encoding, offset, bytes, \
            next_offset, truncated}: `truncated` true means the file goes on past `max_bytes` (default \
            64 KiB); call again with offset = next_offset for the rest. Text that is not UTF-8 is \
            shown with replacement characters (lossy: true): use encoding \"base64\" for binary files.",
        annotations(read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(p): Parameters<ReadFileParams>) -> Reply {
        if p.max_bytes == 0 {
            return Err(ToolError::invalid("max_bytes must be at least 1"));
        }
        let (mut data, truncated) = self.read_guest_file(&p.sandbox_id, &p.path, p.offset, p.max_bytes).await?;
        let (content, lossy) = match p.encoding {
            Encoding::Base64 => (BASE64.encode(&data), false),
            Encoding::Utf8 => {
                if truncated {
                    let keep = whole_chars(&data);
                    if keep > 0 {
                        data.truncate(keep);
                    }
                }
                match String::from_utf8(data.clone()) {
                    Ok(s) => (s, false),
                    Err(_) => (String::from_utf8_lossy(&data).into_owned(), true),
                }
            }
        };
        let bytes = data.len() as u64;
        let mut answer = json!({
            "path": p.path,
            "encoding": p.encoding,
            "offset": p.offset,
            "bytes": bytes,
            "next_offset": p.offset + bytes,
            "truncated": truncated,
            "content": content,
        });
        if lossy {
            answer["lossy"] = true.into();
        }
        Ok(Answer(answer))
    }

    #[tool(description = "Create or replace a file in a sandbox with the given content (written \
        to a temporary file and renamed into place, so readers never see half of it). Answers \
        {path, size, mode, digest}. Text by default; binary content as base64 with encoding \
        \"base64\". Set mode \"755\" for a script to run.")]
    async fn write_file(&self, Parameters(p): Parameters<WriteFileParams>) -> Reply {
        let data = match p.encoding {
            Encoding::Utf8 => p.content.into_bytes(),
            Encoding::Base64 => BASE64
                .decode(p.content.trim())
                .map_err(|e| ToolError::invalid(format!("content is not valid base64: {e}")))?,
        };
        let mode = match p.mode.as_deref().map(str::trim) {
            None | Some("") => 0,
            Some(m) => {
                u32::from_str_radix(m.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| {
                    ToolError::invalid(format!("mode {m:?} is not octal permission bits such as \"644\""))
                })?
            }
        };
        let mut messages = vec![WriteFileRequest { id: p.sandbox_id, path: p.path, data: Vec::new(), mode }];
        for (i, chunk) in data.chunks(WRITE_CHUNK).enumerate() {
            if i == 0 {
                messages[0].data = chunk.to_vec();
            } else {
                messages.push(WriteFileRequest { data: chunk.to_vec(), ..Default::default() });
            }
        }
        let info = unary(&self.conn, self.conn.sandboxes().write_file(tokio_stream::iter(messages))).await?;
        let mut answer = views::file(&info);
        answer["digest"] = info.digest.into();
        Ok(Answer(answer))
    }

    #[tool(
        description = "List a directory in a sandbox. Answers {path, entries: [{name, path, size \
            (bytes), mode (octal), is_dir, is_symlink, mtime_unix}]}.",
        annotations(read_only_hint = true)
    )]
    async fn list_files(&self, Parameters(p): Parameters<ListFilesParams>) -> Reply {
        let req = ListFilesRequest { id: p.sandbox_id, path: p.path.clone() };
        let resp = unary(&self.conn, self.conn.sandboxes().list_files(req)).await?;
        let entries: Vec<_> = resp.entries.iter().map(views::file).collect();
        Ok(Answer(json!({ "path": p.path, "entries": entries })))
    }

    #[tool(
        description = "Wait until a file in a sandbox contains some text, e.g. until a server's \
            log says \"Listening on\" or a job writes \"DONE\". Reads the file every 0.5 s (it may \
            not exist yet) for up to `timeout_secs` (default 60). Answers {found: true, waited_ms, \
            lines} with the lines holding the text; on timeout a DEADLINE_EXCEEDED error showing \
            the end of the file.",
        annotations(read_only_hint = true)
    )]
    async fn wait_for_text(&self, Parameters(p): Parameters<WaitForTextParams>) -> Reply {
        if p.text.is_empty() {
            return Err(ToolError::invalid("text must not be empty"));
        }
        if !(1..=MAX_WAIT_SECS).contains(&p.timeout_secs) {
            return Err(ToolError::invalid(format!("timeout_secs must be 1 to {MAX_WAIT_SECS}")));
        }
        let begun = Instant::now();
        let give_up = begun + Duration::from_secs(u64::from(p.timeout_secs));
        let needle = p.text.as_bytes();
        // What the last read saw: None while the file does not exist.
        let mut last: Option<Vec<u8>>;
        loop {
            match self.read_guest_file(&p.sandbox_id, &p.path, 0, u64::MAX).await {
                Ok((data, _)) => {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        let content = String::from_utf8_lossy(&data);
                        return Ok(Answer(json!({
                            "found": true,
                            "path": p.path,
                            "waited_ms": begun.elapsed().as_millis() as u64,
                            "lines": matching_lines(&content, &p.text),
                        })));
                    }
                    last = Some(data);
                }
                // A file that does not exist yet; anything else (the sandbox
                // is gone, the path is a directory) ends the wait.
                Err(e) if e.code == code_name(Code::NotFound) => {
                    let req = GetSandboxRequest { id: p.sandbox_id.clone() };
                    unary(&self.conn, self.conn.sandboxes().get_sandbox(req)).await?;
                    last = None;
                }
                Err(e) => return Err(e),
            }
            if Instant::now() + POLL_EVERY > give_up {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let state = match last {
            None => "the file does not exist".to_string(),
            Some(data) => {
                let tail = &data[data.len().saturating_sub(TAIL_BYTES)..];
                format!("the file has {} bytes; it ends with:\n{}", data.len(), String::from_utf8_lossy(tail))
            }
        };
        Err(ToolError::new(
            code_name(Code::DeadlineExceeded),
            format!("{:?} did not appear in {} within {} s; {state}", p.text, p.path, p.timeout_secs),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_pages_end_on_whole_characters() {
        let s = "aé".as_bytes(); // 'é' is two bytes
        assert_eq!(whole_chars(&s[..2]), 1);
        assert_eq!(whole_chars(s), 3);
        assert_eq!(whole_chars(b"\xff\xfe"), 2, "invalid bytes are not a cut character");
    }

    #[test]
    fn matching_lines_are_few_and_short() {
        let content = format!("a\nready 1\nb\nready 2\n{}ready\n", "x".repeat(600));
        let lines = matching_lines(&content, "ready");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "ready 1");
        assert!(lines[2].ends_with('…') && lines[2].len() < 510);
    }
}
