//! Exit codes and the error type that carries one.
//!
//! Scripts branch on the exit status, so every failure is mapped to one of a
//! few stable codes rather than "1 for everything". The table is printed in
//! `forkd --help` from [`EXIT_CODES_HELP`], so keep the two in step.

use tonic::Code;

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const NOT_FOUND: u8 = 3;
pub const CONFLICT: u8 = 4;
pub const AUTH: u8 = 5;
pub const UNREACHABLE: u8 = 6;
pub const UNIMPLEMENTED: u8 = 7;
pub const EXHAUSTED: u8 = 8;

/// `exec` exit status when the command ran out of time, as timeout(1) does.
pub const EXEC_TIMED_OUT: i32 = 124;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  any other error
  2  usage error or invalid argument (also INVALID_ARGUMENT from the daemon)
  3  not found
  4  conflict: already exists, failed precondition, aborted
  5  authentication or permission denied
  6  daemon unreachable
  7  not implemented by this daemon
  8  resource exhausted or deadline exceeded
  `forkd exec` and `forkd attach` exit with the command's own status instead:
  128+N when signal N ended it, 124 when it timed out.";

/// A failure with the exit code it maps to. Printed as `forkd: <message>`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// A gRPC status from the daemon (or from the transport under it).
    /// `url` names the daemon when it could not be reached.
    pub fn from_status(status: &tonic::Status, url: &str) -> Self {
        let code = code_for_status(status.code());
        let detail = if status.message().is_empty() {
            status.code().description().to_string()
        } else {
            status.message().to_string()
        };
        let message = match status.code() {
            // The transport's own failure carries its cause; an UNAVAILABLE
            // the daemon answered (a guest agent or an object store out of
            // reach) does not, and is not about reaching the daemon.
            Code::Unavailable if std::error::Error::source(status).is_none() && !status.message().is_empty() => {
                format!("unavailable: {detail}")
            }
            Code::Unavailable => unreachable_message(url, &detail_with_source(status, &detail)),
            Code::Unauthenticated => {
                format!("{detail} (pass a token with --token, --token-file, FORKD_TOKEN or FORKD_TOKEN_FILE)")
            }
            Code::Unimplemented => format!("the daemon at {url} does not support this: {detail}"),
            Code::DeadlineExceeded => format!("deadline exceeded: {detail}"),
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Cancelled => {
                format!("{}: {detail}", status.code().description())
            }
            _ => detail,
        };
        Self { code, message }
    }
}

/// The exit code for a gRPC status code.
pub fn code_for_status(code: Code) -> u8 {
    match code {
        Code::Ok => OK,
        Code::InvalidArgument | Code::OutOfRange => USAGE,
        Code::NotFound => NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => CONFLICT,
        Code::Unauthenticated | Code::PermissionDenied => AUTH,
        Code::Unavailable => UNREACHABLE,
        Code::Unimplemented => UNIMPLEMENTED,
        Code::ResourceExhausted | Code::DeadlineExceeded => EXHAUSTED,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => FAILURE,
    }
}

/// Message for a daemon that cannot be reached, naming where we looked and
/// what usually fixes it.
pub fn unreachable_message(url: &str, detail: &str) -> String {
    format!(
        "cannot reach the forkd daemon at {url}: {detail} \
         (is forkd-server running? set --url or FORKD_URL to point elsewhere)"
    )
}

/// Transport failures hide the useful part ("connection refused") in the
/// error's source chain; the status message alone is just "transport error".
fn detail_with_source(status: &tonic::Status, detail: &str) -> String {
    let mut out = detail.to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = err.source();
    }
    out
}

/// Joins an error and its causes into one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The process exit status of a finished `exec`: the command's own code,
/// 128+N for signal N, 124 for a timeout.
pub fn exec_exit_code(exit_code: i32, signal: i32, timed_out: bool) -> i32 {
    if timed_out {
        EXEC_TIMED_OUT
    } else if signal > 0 {
        (128 + signal).min(255)
    } else if !(0..=255).contains(&exit_code) {
        // -1 without a signal, or a value no process can exit with.
        FAILURE as i32
    } else {
        exit_code
    }
}

/// The exit code for any error a command returned.
pub fn code_for_error(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(cli) = cause.downcast_ref::<CliError>() {
            return cli.code;
        }
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            return code_for_status(status.code());
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let cases = [
            (Code::Ok, 0),
            (Code::Cancelled, 1),
            (Code::Unknown, 1),
            (Code::InvalidArgument, 2),
            (Code::DeadlineExceeded, 8),
            (Code::NotFound, 3),
            (Code::AlreadyExists, 4),
            (Code::PermissionDenied, 5),
            (Code::ResourceExhausted, 8),
            (Code::FailedPrecondition, 4),
            (Code::Aborted, 4),
            (Code::OutOfRange, 2),
            (Code::Unimplemented, 7),
            (Code::Internal, 1),
            (Code::Unavailable, 6),
            (Code::DataLoss, 1),
            (Code::Unauthenticated, 5),
        ];
        for (code, want) in cases {
            assert_eq!(code_for_status(code), want, "{code:?}");
        }
    }

    #[test]
    fn every_exit_code_is_documented() {
        for code in [OK, FAILURE, USAGE, NOT_FOUND, CONFLICT, AUTH, UNREACHABLE, UNIMPLEMENTED, EXHAUSTED] {
            assert!(EXIT_CODES_HELP.contains(&format!("\n  {code}  ")), "{code} missing from help");
        }
    }

    #[test]
    fn unavailable_names_the_url_and_the_server() {
        // A transport failure: tonic's status carries the error as its source.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let mut status = tonic::Status::unavailable("connection refused");
        status.set_source(std::sync::Arc::new(refused));
        let err = CliError::from_status(&status, "http://127.0.0.1:1");
        assert_eq!(err.code, UNREACHABLE);
        assert!(err.message.contains("http://127.0.0.1:1"));
        assert!(err.message.contains("forkd-server"));
        assert!(err.message.contains("connection refused"));
    }

    #[test]
    fn unavailable_answered_by_the_daemon_is_not_about_reaching_it() {
        let err = CliError::from_status(&tonic::Status::unavailable("remote: store down"), "http://127.0.0.1:1");
        assert_eq!(err.code, UNREACHABLE);
        assert_eq!(err.message, "unavailable: remote: store down");
    }

    #[test]
    fn server_messages_pass_through() {
        let err = CliError::from_status(&tonic::Status::not_found("no snapshot \"x\""), "u");
        assert_eq!(err.code, NOT_FOUND);
        assert_eq!(err.message, "no snapshot \"x\"");
        let err = CliError::from_status(&tonic::Status::new(Code::NotFound, ""), "u");
        assert!(!err.message.is_empty());
    }

    #[test]
    fn exec_codes() {
        assert_eq!(exec_exit_code(0, 0, false), 0);
        assert_eq!(exec_exit_code(3, 0, false), 3);
        assert_eq!(exec_exit_code(-1, 9, false), 137);
        assert_eq!(exec_exit_code(-1, 15, false), 143);
        assert_eq!(exec_exit_code(-1, 9, true), 124);
        assert_eq!(exec_exit_code(-1, 0, false), 1);
        assert_eq!(exec_exit_code(300, 0, false), 1);
        assert_eq!(exec_exit_code(-1, 200, false), 255);
    }

    #[test]
    fn errors_find_their_code_through_context() {
        let err = anyhow::Error::new(CliError::new(NOT_FOUND, "gone")).context("deleting x");
        assert_eq!(code_for_error(&err), NOT_FOUND);
        let err = anyhow::Error::new(tonic::Status::already_exists("dup"));
        assert_eq!(code_for_error(&err), CONFLICT);
        assert_eq!(code_for_error(&anyhow::anyhow!("plain")), FAILURE);
    }
}
