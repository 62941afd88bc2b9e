//! Running code: exec_command (a command to completion) and eval_code (the
//! warm Python interpreter).

use std::collections::HashMap;

use forkd_api::v1::{EvalRequest, ExecRequest};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::ForkdMcp;
use super::reply::{Answer, Reply, ToolError, unary};
use super::views::exec_result;

/// Output kept per stream when the caller does not say: enough for most
/// commands, small enough not to flood a model's context.
const DEFAULT_OUTPUT_BYTES: u64 = 64 * 1024;

/// The argv to run: `args` as given, or `command` through `sh -c`.
pub fn command_argv(args: Option<Vec<String>>, command: Option<String>) -> Result<Vec<String>, ToolError> {
    match (args, command) {
        (Some(_), Some(_)) => Err(ToolError::invalid("give either `args` or `command`, not both")),
        (Some(args), None) if args.is_empty() || args[0].is_empty() => {
            Err(ToolError::invalid("`args` must start with the program to run"))
        }
        (Some(args), None) => Ok(args),
        (None, Some(command)) if command.trim().is_empty() => Err(ToolError::invalid("`command` is empty")),
        (None, Some(command)) => Ok(vec!["sh".into(), "-c".into(), command]),
        (None, None) => Err(ToolError::invalid(
            "give the command: `args` (a list such as [\"ls\", \"-la\"]) or `command` (a shell string)",
        )),
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a".
    pub sandbox_id: String,
    /// The program and its arguments, run directly (no shell), e.g.
    /// ["python3", "-c", "print(1)"]. Give this or `command`.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// A shell command line, run with `sh -c` (pipes, redirections, && and
    /// globbing work), e.g. "cd /tmp && ls -la | head". Give this or `args`.
    #[serde(default)]
    pub command: Option<String>,
    /// Seconds before the command is killed (default 60). For longer or
    /// never-ending programs use start_process.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
    /// Environment variables added for the command, e.g. {"DEBUG": "1"}.
    #[serde(default)]
    pub env: HashMap<String, String>,
    /// Absolute working directory in the guest (default: the guest's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text fed to the command's standard input (default: none).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Most bytes of stdout, and of stderr, returned (default 65536); the
    /// rest is dropped and `stdout_truncated`/`stderr_truncated` say so.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Sandbox id, e.g. "sb-3k9x2m1q8z0a". Its snapshot must have runtime "python".
    pub sandbox_id: String,
    /// Python source: statements, optionally ending in an expression whose
    /// repr() is returned as `result`, e.g. "import math\nmath.sqrt(2)".
    pub code: String,
    /// Seconds before the evaluation is interrupted with a TimeoutError
    /// (default: the daemon's).
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

#[tool_router(router = run_tools, vis = "pub(super)")]
impl ForkdMcp {
    #[tool(description = "Run a command in a sandbox to completion and return its output. Give \
        `args` (argv list, no shell) or `command` (a shell string run with sh -c). Answers \
        {exit_code, signal, timed_out, duration_ms, stdout, stderr, stdout_truncated, \
        stderr_truncated}; exit_code is -1 when a signal ended it. A non-zero exit is a normal \
        answer, not an error. Limited to `timeout_secs` (default 60 s); for servers and other \
        long-running programs use start_process.")]
    async fn exec_command(&self, Parameters(p): Parameters<ExecParams>) -> Reply {
        let args = command_argv(p.args, p.command)?;
        let req = ExecRequest {
            id: p.sandbox_id,
            args,
            timeout_secs: p.timeout_secs.unwrap_or(0),
            env: p.env,
            cwd: p.cwd.unwrap_or_default(),
            stdin: p.stdin.unwrap_or_default().into_bytes(),
            max_output_bytes: p.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES),
            ..Default::default()
        };
        let resp = unary(&self.conn, self.conn.sandboxes().exec(req)).await?;
        Ok(Answer(exec_result(&resp)))
    }

    #[tool(description = "Evaluate Python code in the sandbox's persistent, warm interpreter: \
        variables, imports and functions defined by one call are there for the next one (per \
        sandbox). Answers {ok, result, stdout, stderr, error, exit_code}: `result` is the repr() \
        of a final expression (\"\" when there is none), `error` the traceback of an exception \
        (then ok is false). Faster than exec_command(\"python3 ...\") as nothing starts.")]
    async fn eval_code(&self, Parameters(p): Parameters<EvalParams>) -> Reply {
        let req = EvalRequest { id: p.sandbox_id, code: p.code, timeout_secs: p.timeout_secs.unwrap_or(0) };
        let r = unary(&self.conn, self.conn.sandboxes().eval(req)).await?;
        Ok(Answer(json!({
            "ok": r.error.is_empty() && r.exit_code == 0,
            "result": r.result,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "error": r.error,
            "exit_code": r.exit_code,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_args_or_a_shell_string() {
        assert_eq!(command_argv(Some(vec!["ls".into()]), None).unwrap(), vec!["ls"]);
        assert_eq!(command_argv(None, Some("a | b".into())).unwrap(), vec!["sh", "-c", "a | b"]);
        for (args, command) in
            [(None, None), (Some(vec![]), None), (Some(vec!["x".into()]), Some("y".into())), (None, Some(" ".into()))]
        {
            assert_eq!(command_argv(args, command).unwrap_err().code, "INVALID_ARGUMENT");
        }
    }
}
