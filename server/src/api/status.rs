//! The single mapping from runtime errors to gRPC statuses.

use tonic::{Code, Status};

use crate::core::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// UNIMPLEMENTED for a capability that this build does not have yet.
pub fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by this forkd-server yet"))
}
