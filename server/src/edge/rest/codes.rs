//! gRPC status codes as HTTP statuses and names.

use http::StatusCode;
use tonic::Code;

pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("valid"),
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub use forkd_api::codes::name;

/// The JSON error body every REST error uses.
pub fn error_body(code: Code, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message, "code": name(code) })
}

/// A status as a REST answer: its HTTP status and the JSON error body.
pub fn status_response(s: &tonic::Status) -> axum::response::Response {
    use axum::response::IntoResponse;
    (http_status(s.code()), axum::Json(error_body(s.code(), s.message()))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usual_mapping() {
        assert_eq!(http_status(Code::InvalidArgument), 400);
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::AlreadyExists), 409);
        assert_eq!(http_status(Code::FailedPrecondition), 409);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Unimplemented), 501);
    }
}
