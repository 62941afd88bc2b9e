//! The one error type of the runtime. Each variant says what kind of failure
//! it is, so the edge can map it to a gRPC status and an HTTP code in one place
//! (`api::status`).

use forkd_api::names::NameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending input.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The target is in a state that does not allow the call (e.g. spawning
    /// from a snapshot that is still being written).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller may see the target but not do this to it.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("invalid {field}: {msg}"))
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<crate::host::admission::Refused> for Error {
    fn from(e: crate::host::admission::Refused) -> Self {
        Error::ResourceExhausted(e.message)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Internal(format!("state store: {e}"))
    }
}

impl From<crate::vmm::VmmError> for Error {
    fn from(e: crate::vmm::VmmError) -> Self {
        Error::Internal(format!("vmm: {e}"))
    }
}

impl From<crate::agent::AgentError> for Error {
    fn from(e: crate::agent::AgentError) -> Self {
        use crate::agent::AgentError as A;
        match e {
            A::Guest { kind, message } => {
                use forkd_agent_protocol::v1::agent_error::Kind;
                match Kind::try_from(kind).unwrap_or(Kind::Internal) {
                    Kind::NotFound => Error::NotFound(message),
                    Kind::Invalid => Error::InvalidArgument(message),
                    Kind::Permission => Error::FailedPrecondition(message),
                    Kind::TooLarge => Error::ResourceExhausted(message),
                    Kind::Timeout => Error::DeadlineExceeded(message),
                    Kind::Exists => Error::AlreadyExists(message),
                    Kind::Exited => Error::FailedPrecondition(message),
                    Kind::Internal => Error::Internal(format!("guest agent: {message}")),
                }
            }
            A::Timeout(what) => Error::DeadlineExceeded(format!("guest agent did not answer {what} in time")),
            other => Error::Unavailable(format!("guest agent: {other}")),
        }
    }
}
