//! What a tool answers: a JSON object on success, and on failure an MCP tool
//! error (`isError: true`) whose text starts with the gRPC status code name,
//! so a model sees `NOT_FOUND: no sandbox "sb-x"` rather than a broken
//! protocol exchange.

use std::future::Future;
use std::time::Duration;

use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::model::{CallToolResponse, CallToolResult, ContentBlock};
use serde_json::Value;
use tonic::Code;

use crate::client::Conn;

/// A successful answer. The model reads it as indented JSON text; programs
/// get the same object as structured content.
#[derive(Debug)]
pub struct Answer(pub Value);

impl IntoCallToolResult for Answer {
    fn into_call_tool_result(self) -> Result<CallToolResponse, rmcp::ErrorData> {
        let text = serde_json::to_string_pretty(&self.0).unwrap_or_else(|_| self.0.to_string());
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        // MCP wants structured content to be an object.
        if self.0.is_object() {
            result.structured_content = Some(self.0);
        }
        Ok(result.into())
    }
}

/// A failure the caller should see, as `CODE: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub code: &'static str,
    pub message: String,
}

impl ToolError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A bad argument caught before anything was sent to the daemon.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(code_name(Code::InvalidArgument), message)
    }

    /// The failure of a call to the daemon. `url` names the daemon when it
    /// could not be reached or does not know the call.
    pub fn from_status(status: &tonic::Status, url: &str) -> Self {
        let mut message = status.message().to_string();
        // Transport failures hide the cause ("connection refused") in the
        // source chain; the message alone says "transport error".
        let mut source = std::error::Error::source(status);
        while let Some(err) = source {
            let text = err.to_string();
            if !message.contains(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            source = err.source();
        }
        if message.is_empty() {
            message = status.code().description().to_string();
        }
        match status.code() {
            Code::Unavailable if std::error::Error::source(status).is_some() => {
                message = format!("cannot reach the forkd daemon at {url}: {message} (is forkd-server running?)");
            }
            Code::Unimplemented => {
                message = format!("the daemon at {url} does not support this call (an older forkd-server?): {message}");
            }
            _ => {}
        }
        Self::new(code_name(status.code()), message)
    }

    pub fn text(&self) -> String {
        format!("{}: {}", self.code, self.message)
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl IntoCallToolResult for ToolError {
    fn into_call_tool_result(self) -> Result<CallToolResponse, rmcp::ErrorData> {
        Ok(CallToolResult::error(vec![ContentBlock::text(self.text())]).into())
    }
}

/// What every tool returns.
pub type Reply = Result<Answer, ToolError>;

pub use forkd_api::codes::name as code_name;

/// The text rmcp gives arguments that do not match a tool's schema.
const ARGUMENT_ERROR_PREFIX: &str = "failed to deserialize parameters: ";

/// Rewrites rmcp's own argument error (`failed to deserialize parameters:
/// missing field ...`) as `INVALID_ARGUMENT: <tool>: missing field ...`, so
/// every tool error has the same shape.
pub fn reword_argument_error(tool: &str, response: CallToolResponse) -> CallToolResponse {
    let CallToolResponse::Complete(mut result) = response else {
        return response;
    };
    if result.is_error == Some(true)
        && let [ContentBlock::Text(text)] = result.content.as_mut_slice()
        && let Some(detail) = text.text.strip_prefix(ARGUMENT_ERROR_PREFIX)
    {
        text.text = format!("{}: {tool}: {detail}", code_name(Code::InvalidArgument));
    }
    CallToolResponse::Complete(result)
}

/// Awaits one unary call to the daemon, bounded by the CLI's --timeout like
/// every other command's calls.
pub async fn unary<T>(
    conn: &Conn,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ToolError> {
    let result = match conn.deadline() {
        Some(d) => tokio::time::timeout(d, fut).await.map_err(|_| deadline_error(conn, d))?,
        None => fut.await,
    };
    result.map(tonic::Response::into_inner).map_err(|s| ToolError::from_status(&s, &conn.url))
}

pub fn deadline_error(conn: &Conn, d: Duration) -> ToolError {
    ToolError::new(
        code_name(Code::DeadlineExceeded),
        format!("no answer from {} within {} (forkd --timeout)", conn.url, humantime::format_duration(d)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(response: Result<CallToolResponse, rmcp::ErrorData>) -> (bool, String) {
        let CallToolResponse::Complete(result) = response.unwrap() else { panic!("not complete") };
        let text = result.content[0].as_text().unwrap().text.clone();
        (result.is_error == Some(true), text)
    }

    #[test]
    fn statuses_become_tool_errors_with_the_code_name() {
        let err = ToolError::from_status(&tonic::Status::not_found("no sandbox \"sb-x\""), "http://h:1");
        let (is_error, text) = shown(err.into_call_tool_result());
        assert!(is_error);
        assert_eq!(text, "NOT_FOUND: no sandbox \"sb-x\"");

        let err = ToolError::from_status(&tonic::Status::unimplemented(""), "http://h:1");
        assert_eq!(err.code, "UNIMPLEMENTED");
        assert!(err.message.contains("http://h:1"), "{}", err.message);
        let err = ToolError::from_status(&tonic::Status::new(Code::Internal, ""), "u");
        assert!(!err.message.is_empty());
    }

    #[test]
    fn transport_failures_name_the_daemon() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let mut status = tonic::Status::unavailable("transport error");
        status.set_source(std::sync::Arc::new(refused));
        let err = ToolError::from_status(&status, "http://127.0.0.1:1");
        assert_eq!(err.code, "UNAVAILABLE");
        assert!(err.message.contains("connection refused") && err.message.contains("http://127.0.0.1:1"));
    }

    #[test]
    fn answers_are_json_text_and_structured_content() {
        let answer = Answer(serde_json::json!({"id": "sb-1", "n": 2}));
        let CallToolResponse::Complete(result) = answer.into_call_tool_result().unwrap() else { panic!() };
        assert_eq!(result.is_error, Some(false));
        let text = result.content[0].as_text().unwrap().text.clone();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["id"], "sb-1");
        assert_eq!(result.structured_content.unwrap()["n"], 2);
    }

    #[test]
    fn argument_errors_are_reworded() {
        let raw = CallToolResult::error(vec![ContentBlock::text(format!("{ARGUMENT_ERROR_PREFIX}missing field `x`"))]);
        let (is_error, text) = shown(Ok(reword_argument_error("get_sandbox", raw.into())));
        assert!(is_error);
        assert_eq!(text, "INVALID_ARGUMENT: get_sandbox: missing field `x`");
        let other = CallToolResult::error(vec![ContentBlock::text("NOT_FOUND: gone")]);
        let (_, text) = shown(Ok(reword_argument_error("t", other.into())));
        assert_eq!(text, "NOT_FOUND: gone");
    }
}
