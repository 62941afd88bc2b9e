//! The Connect protocol (connectrpc.com/docs/protocol) as E2B's SDKs speak
//! it to envd: every call is a POST to `/<package>.<Service>/<Method>`.
//! Unary calls carry one message as `application/json` or
//! `application/proto`; server streams answer with `application/connect+json`
//! (or `+proto`): each message in an envelope (a flags byte and a big-endian
//! u32 length), the last one an end-of-stream envelope (flag 0x02) holding
//! `{}` or `{"error": {"code", "message"}}`. Compressed messages are refused
//! (neither SDK sends them). Errors of a unary call are an HTTP status with a
//! JSON body; a stream's errors go in its end-of-stream envelope.
//!
//! The JSON encoding is protobuf's canonical one, done by `prost-reflect`
//! over the envd descriptor set, so one set of message types serves both.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// Largest request message accepted (stdin chunks are the big ones).
pub const MAX_MESSAGE: usize = 2 << 20;
const END_STREAM: u8 = 0x02;
const COMPRESSED: u8 = 0x01;

/// How a call's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Proto,
}

/// What the request headers say about a call.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub encoding: Encoding,
    pub streaming: bool,
    /// `Connect-Timeout-Ms`: when the client gives up on the call.
    pub timeout: Option<Duration>,
    /// `Keepalive-Ping-Interval` (seconds, an envd extension): how often an
    /// idle stream sends a keepalive message.
    pub keepalive: Option<Duration>,
}

impl Call {
    pub fn from_headers(h: &HeaderMap) -> Result<Call, Status> {
        let ct = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let base = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let (encoding, streaming) = match base.as_str() {
            "application/json" => (Encoding::Json, false),
            "application/proto" => (Encoding::Proto, false),
            "application/connect+json" => (Encoding::Json, true),
            "application/connect+proto" => (Encoding::Proto, true),
            other => {
                return Err(Status::invalid_argument(format!(
                    "content type {other:?} is not a Connect encoding (application/json, application/proto, \
                     application/connect+json, application/connect+proto)"
                )));
            }
        };
        for name in ["content-encoding", "connect-content-encoding"] {
            if let Some(enc) = h.get(name).and_then(|v| v.to_str().ok())
                && !enc.eq_ignore_ascii_case("identity")
            {
                return Err(Status::unimplemented(format!("{name} {enc:?} is not supported; send identity")));
            }
        }
        let number = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let timeout = number("connect-timeout-ms").filter(|ms| *ms > 0).map(Duration::from_millis);
        let keepalive = number("keepalive-ping-interval").filter(|s| *s > 0).map(|s| Duration::from_secs(s.min(3600)));
        Ok(Call { encoding, streaming, timeout, keepalive })
    }

    fn content_type(&self) -> &'static str {
        match (self.streaming, self.encoding) {
            (false, Encoding::Json) => "application/json",
            (false, Encoding::Proto) => "application/proto",
            (true, Encoding::Json) => "application/connect+json",
            (true, Encoding::Proto) => "application/connect+proto",
        }
    }
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(forkd_api::e2b::FILE_DESCRIPTOR_SET).expect("the envd descriptor set is valid")
    })
}

fn descriptor(name: &str) -> MessageDescriptor {
    pool().get_message_by_name(name).unwrap_or_else(|| panic!("{name} is in the envd descriptor set"))
}

/// A message type of the envd protocol and its full protobuf name.
pub trait EnvdMessage: Message + Default + 'static {
    const NAME: &'static str;
}

/// Decodes one request message.
pub fn decode<T: EnvdMessage>(enc: Encoding, bytes: &[u8]) -> Result<T, Status> {
    match enc {
        Encoding::Proto => T::decode(bytes).map_err(|e| Status::invalid_argument(format!("bad {}: {e}", T::NAME))),
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let opts = DeserializeOptions::new().deny_unknown_fields(false);
            let dm = DynamicMessage::deserialize_with_options(descriptor(T::NAME), &mut de, &opts)
                .map_err(|e| Status::invalid_argument(format!("bad {} JSON: {e}", T::NAME)))?;
            dm.transcode_to::<T>().map_err(|e| Status::internal(format!("{}: {e}", T::NAME)))
        }
    }
}

/// Encodes one response message.
pub fn encode<T: EnvdMessage>(enc: Encoding, msg: &T) -> Bytes {
    match enc {
        Encoding::Proto => Bytes::from(msg.encode_to_vec()),
        Encoding::Json => {
            let mut dm = DynamicMessage::new(descriptor(T::NAME));
            dm.transcode_from(msg).expect("a message transcodes to its own descriptor");
            let mut out = Vec::with_capacity(64);
            let mut ser = serde_json::Serializer::new(&mut out);
            dm.serialize_with_options(&mut ser, &SerializeOptions::new()).expect("JSON encoding cannot fail");
            Bytes::from(out)
        }
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(flags);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// One message of a stream, in its envelope.
pub fn frame<T: EnvdMessage>(enc: Encoding, msg: &T) -> Bytes {
    envelope(0, &encode(enc, msg))
}

/// The connect code name of a gRPC code (`not_found`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status the Connect protocol gives a code.
pub fn http_status(code: Code) -> StatusCode {
    let n = match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    };
    StatusCode::from_u16(n).expect("valid status")
}

fn error_json(s: &Status) -> serde_json::Value {
    serde_json::json!({ "code": code_name(s.code()), "message": s.message() })
}

/// The end-of-stream envelope (always JSON, whatever the message encoding).
pub fn end_frame(error: Option<&Status>) -> Bytes {
    let body = match error {
        Some(s) => serde_json::json!({ "error": error_json(s) }),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM, &serde_json::to_vec(&body).unwrap_or_default())
}

/// A unary call's answer.
pub fn unary<T: EnvdMessage>(call: &Call, msg: &T) -> Response {
    let mut r = Response::new(Body::from(encode(call.encoding, msg)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(call.content_type()));
    r
}

/// A call's error: an HTTP error for a unary call, a 200 holding only the
/// end-of-stream envelope for a stream (what both SDKs read best).
pub fn error(call: Option<&Call>, s: &Status) -> Response {
    match call {
        Some(c) if c.streaming => {
            let mut r = Response::new(Body::from(end_frame(Some(s))));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(c.content_type()));
            r
        }
        _ => {
            let mut r = Response::new(Body::from(serde_json::to_vec(&error_json(s)).unwrap_or_default()));
            *r.status_mut() = http_status(s.code());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    }
}

/// A server stream's answer: the frames that arrive on `rx` (the producer
/// sends the end-of-stream envelope last).
pub fn stream(call: &Call, rx: mpsc::Receiver<Bytes>) -> Response {
    use tokio_stream::StreamExt;
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Bytes, std::convert::Infallible>);
    let mut r = Response::new(Body::from_stream(frames));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(call.content_type()));
    r
}

/// The one message of a server-streaming request: a single envelope.
pub fn single_envelope(body: &[u8]) -> Result<&[u8], Status> {
    let (flags, payload, rest) = split_envelope(body)?;
    if flags & COMPRESSED != 0 {
        return Err(Status::unimplemented("compressed messages are not supported"));
    }
    if !rest.is_empty() {
        return Err(Status::invalid_argument("a server-streaming request carries exactly one message"));
    }
    Ok(payload)
}

/// Splits the first envelope off `buf`: (flags, payload, rest).
pub fn split_envelope(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), Status> {
    if buf.len() < 5 {
        return Err(Status::invalid_argument("incomplete envelope"));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Status::resource_exhausted(format!("message of {len} bytes exceeds {MAX_MESSAGE}")));
    }
    if buf.len() < 5 + len {
        return Err(Status::invalid_argument("incomplete envelope"));
    }
    Ok((buf[0], &buf[5..5 + len], &buf[5 + len..]))
}

macro_rules! envd_messages {
    ($($path:path => $name:literal),* $(,)?) => {
        $(impl EnvdMessage for $path { const NAME: &'static str = $name; })*
    };
}

use forkd_api::e2b::{filesystem as fs, process as pr};

envd_messages! {
    pr::ListRequest => "process.ListRequest",
    pr::ListResponse => "process.ListResponse",
    pr::StartRequest => "process.StartRequest",
    pr::StartResponse => "process.StartResponse",
    pr::ConnectRequest => "process.ConnectRequest",
    pr::ConnectResponse => "process.ConnectResponse",
    pr::UpdateRequest => "process.UpdateRequest",
    pr::UpdateResponse => "process.UpdateResponse",
    pr::SendInputRequest => "process.SendInputRequest",
    pr::SendInputResponse => "process.SendInputResponse",
    pr::StreamInputRequest => "process.StreamInputRequest",
    pr::StreamInputResponse => "process.StreamInputResponse",
    pr::SendSignalRequest => "process.SendSignalRequest",
    pr::SendSignalResponse => "process.SendSignalResponse",
    pr::CloseStdinRequest => "process.CloseStdinRequest",
    pr::CloseStdinResponse => "process.CloseStdinResponse",
    fs::StatRequest => "filesystem.StatRequest",
    fs::StatResponse => "filesystem.StatResponse",
    fs::MakeDirRequest => "filesystem.MakeDirRequest",
    fs::MakeDirResponse => "filesystem.MakeDirResponse",
    fs::MoveRequest => "filesystem.MoveRequest",
    fs::MoveResponse => "filesystem.MoveResponse",
    fs::ListDirRequest => "filesystem.ListDirRequest",
    fs::ListDirResponse => "filesystem.ListDirResponse",
    fs::RemoveRequest => "filesystem.RemoveRequest",
    fs::RemoveResponse => "filesystem.RemoveResponse",
    fs::WatchDirRequest => "filesystem.WatchDirRequest",
    fs::WatchDirResponse => "filesystem.WatchDirResponse",
    fs::CreateWatcherRequest => "filesystem.CreateWatcherRequest",
    fs::CreateWatcherResponse => "filesystem.CreateWatcherResponse",
    fs::GetWatcherEventsRequest => "filesystem.GetWatcherEventsRequest",
    fs::GetWatcherEventsResponse => "filesystem.GetWatcherEventsResponse",
    fs::RemoveWatcherRequest => "filesystem.RemoveWatcherRequest",
    fs::RemoveWatcherResponse => "filesystem.RemoveWatcherResponse",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_uses_camel_case_names_and_enum_names() {
        let req: pr::SendSignalRequest =
            decode(Encoding::Json, br#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL","extra":1}"#).unwrap();
        assert_eq!(req.signal, pr::Signal::Sigkill as i32);
        assert_eq!(req.process.unwrap().selector, Some(pr::process_selector::Selector::Pid(42)));
        let end = pr::StartResponse {
            event: Some(pr::ProcessEvent {
                event: Some(pr::process_event::Event::End(pr::process_event::EndEvent {
                    exit_code: 3,
                    exited: true,
                    status: "exit status 3".into(),
                    error: None,
                })),
            }),
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(Encoding::Json, &end)).unwrap();
        assert_eq!(json["event"]["end"]["exitCode"], 3);
        let keep = pr::StartResponse {
            event: Some(pr::ProcessEvent {
                event: Some(pr::process_event::Event::Keepalive(pr::process_event::KeepAlive {})),
            }),
        };
        assert_eq!(&encode(Encoding::Json, &keep)[..], br#"{"event":{"keepalive":{}}}"#);
        let data: pr::SendInputRequest =
            decode(Encoding::Json, br#"{"process":{"pid":1},"input":{"stdin":"aGk="}}"#).unwrap();
        assert_eq!(data.input.unwrap().input, Some(pr::process_input::Input::Stdin(b"hi".to_vec())));
    }

    #[test]
    fn envelopes_are_bounded_and_checked() {
        let f = frame(Encoding::Json, &fs::StatRequest { path: "/x".into() });
        assert_eq!(f[0], 0);
        let payload = single_envelope(&f).unwrap();
        let back: fs::StatRequest = decode(Encoding::Json, payload).unwrap();
        assert_eq!(back.path, "/x");
        assert!(single_envelope(&f[..f.len() - 1]).is_err());
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(split_envelope(&huge).unwrap_err().code(), Code::ResourceExhausted);
        let end = end_frame(Some(&Status::not_found("gone")));
        assert_eq!(end[0], END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&end[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }

    #[test]
    fn content_types_select_the_encoding() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/connect+json"));
        h.insert("connect-timeout-ms", HeaderValue::from_static("60000"));
        h.insert("keepalive-ping-interval", HeaderValue::from_static("50"));
        let c = Call::from_headers(&h).unwrap();
        assert!(c.streaming && c.encoding == Encoding::Json);
        assert_eq!(c.timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.keepalive, Some(Duration::from_secs(50)));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(Call::from_headers(&h).is_err());
    }
}
