//! REST → gRPC transcoding driven by the descriptor set.

use std::convert::Infallible;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, SerializeOptions, Value,
};
use serde::Deserialize;
use tonic::Code;
use tower::ServiceExt;

use super::codes;
use super::grpc_frames;
use super::routes::{self, Route};

/// The RPC a request was served by, attached to responses for the audit log
/// and the latency histogram.
#[derive(Debug, Clone)]
pub struct RpcName(pub String);

pub struct Transcoder {
    routes: Vec<Route>,
    grpc: axum::Router,
    max_body: usize,
}

type Resp = Response<Body>;

/// A REST error with its gRPC code.
struct RestError(Code, String);

impl RestError {
    fn into_response(self) -> Resp {
        // An oversize body is the one error whose HTTP status is more
        // specific than its gRPC code's.
        let status = if self.0 == Code::ResourceExhausted && self.1.starts_with(TOO_LARGE) {
            StatusCode::PAYLOAD_TOO_LARGE
        } else if self.0 == Code::InvalidArgument && self.1.starts_with(UNSUPPORTED_TYPE) {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            codes::http_status(self.0)
        };
        json_response(status, &codes::error_body(self.0, &self.1))
    }
}

const TOO_LARGE: &str = "request body exceeds";
const UNSUPPORTED_TYPE: &str = "unsupported content type";

/// `application/json` or a `+json` type, parameters (charset) aside.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A body must say it is JSON. A web page can send `text/plain` or a form
/// to any address without asking first (no CORS preflight); refusing
/// every other type means such a request changes nothing.
fn check_content_type(content_type: &str, body_is_empty: bool) -> Result<(), RestError> {
    let refused = if content_type.is_empty() { !body_is_empty } else { !is_json(content_type) };
    if refused {
        let shown: String = content_type.chars().take(60).collect();
        let got = if shown.is_empty() { "none".to_string() } else { format!("{shown:?}") };
        return Err(RestError(
            Code::InvalidArgument,
            format!("{UNSUPPORTED_TYPE} {got}: a request body must be JSON (content-type: application/json)"),
        ));
    }
    Ok(())
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Resp {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false).skip_default_fields(false)
}

fn to_json(msg: &DynamicMessage) -> serde_json::Value {
    msg.serialize_with_options(serde_json::value::Serializer, &serialize_options()).unwrap_or(serde_json::Value::Null)
}

impl Transcoder {
    pub fn new(grpc: axum::Router, max_body: usize) -> Result<Self, routes::RouteError> {
        let pool = DescriptorPool::decode(forkd_api::FILE_DESCRIPTOR_SET)
            .map_err(|e| routes::RouteError::Descriptor(e.to_string()))?;
        let routes = routes::load(&pool, forkd_api::SERVICES)?;
        Ok(Self { routes, grpc, max_body })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub async fn handle(&self, req: Request<Body>) -> Result<Resp, Infallible> {
        let segments = path_segments(req.uri().path());
        let mut path_known = false;
        for route in &self.routes {
            let Some(vars) = route.match_path(&segments) else { continue };
            path_known = true;
            if route.method != req.method() {
                continue;
            }
            let rpc = RpcName(route.rpc.full_name().to_string());
            let mut resp = match self.call(route, vars, req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            };
            resp.extensions_mut().insert(rpc);
            return Ok(resp);
        }
        let (code, status, msg) = if path_known {
            (
                Code::Unimplemented,
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {} is not allowed on {}", req.method(), req.uri().path()),
            )
        } else {
            (Code::NotFound, StatusCode::NOT_FOUND, format!("no route for {} {}", req.method(), req.uri().path()))
        };
        Ok(json_response(status, &codes::error_body(code, &msg)))
    }

    async fn call(&self, route: &Route, vars: Vec<(String, String)>, req: Request<Body>) -> Result<Resp, RestError> {
        if route.rpc.is_client_streaming() && route.rpc.is_server_streaming() {
            // Input and output interleave: one HTTP request cannot carry that.
            return Err(RestError(
                Code::Unimplemented,
                match route.rpc.name() {
                    "OpenPort" => {
                        "OpenPort is bidirectional: use gRPC, or the HTTP proxy /v1/sandboxes/{id}/ports/{port}/"
                            .to_string()
                    }
                    name => format!(
                        "{name} is bidirectional: use gRPC, or the WebSocket route GET /v1/sandboxes/{{id}}/terminal"
                    ),
                },
            ));
        }
        let input = route.rpc.input();
        // Who is asking travels with the transcoded call.
        let principal = req.extensions().get::<std::sync::Arc<crate::core::tenants::Principal>>().cloned();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let wants_raw =
            req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains(OCTET));
        let wants_body = super::success::wants_representation(req.headers());
        let raw_upload = route.rpc.is_client_streaming() && content_type.starts_with(OCTET) && has_bytes_data(&input);
        if !raw_upload
            && let Some(len) =
                req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            && len > self.max_body
        {
            // Read (and drop) a bounded amount of the body so an HTTP/1.1
            // client that is still sending sees the 413 instead of a reset.
            // A client that sent `Expect: 100-continue` has not sent the body
            // yet: answer at once, without asking for it.
            let expects_continue =
                req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if len <= DRAIN_LIMIT && !expects_continue {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    axum::body::to_bytes(req.into_body(), DRAIN_LIMIT),
                )
                .await;
            }
            return Err(too_large(self.max_body));
        }
        if raw_upload {
            // A raw body streams into the `data` field of successive messages;
            // the other fields come from the path and the query string.
            let mut first = DynamicMessage::new(input.clone());
            apply_query_and_path(&mut first, &input, &query, vars)?;
            let frames = raw_body_frames(first, input.clone(), req.into_body());
            return self.dispatch(route, Body::from_stream(frames), wants_raw, wants_body, principal).await;
        }
        if !content_type.is_empty() {
            check_content_type(&content_type, false)?;
        }
        let body = axum::body::to_bytes(req.into_body(), self.max_body).await.map_err(|_| too_large(self.max_body))?;
        check_content_type(&content_type, body.is_empty())?;
        let msg = request_message(route, vars, &query, &body)?;
        let body = Body::from(grpc_frames::encode(&msg.encode_to_vec()));
        self.dispatch(route, body, wants_raw, wants_body, principal).await
    }

    /// Sends an encoded gRPC request body through the in-process gRPC
    /// services and turns the answer into REST.
    async fn dispatch(
        &self,
        route: &Route,
        grpc_body: Body,
        wants_raw: bool,
        wants_body: bool,
        principal: Option<std::sync::Arc<crate::core::tenants::Principal>>,
    ) -> Result<Resp, RestError> {
        let svc = route.rpc.parent_service();
        let uri = format!("/{}/{}", svc.full_name(), route.rpc.name());
        let mut grpc_req = Request::builder()
            .method(http::Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(grpc_body)
            .map_err(|e| RestError(Code::Internal, e.to_string()))?;
        if let Some(p) = principal {
            grpc_req.extensions_mut().insert(p);
        }
        let resp = self.grpc.clone().oneshot(grpc_req).await.unwrap_or_else(|e| match e {});
        let output = route.rpc.output();
        let (parts, body) = resp.into_parts();
        let mut reader =
            GrpcReader { body, dec: grpc_frames::Decoder::default(), status: header_status(&parts.headers) };

        if !route.rpc.is_server_streaming() {
            let first = reader.next_message().await?;
            let status = reader.finish().await;
            if let Some((code, m)) = status.filter(|(c, _)| *c != Code::Ok) {
                return Err(RestError(code, m));
            }
            let bytes = first.ok_or_else(|| RestError(Code::Internal, "empty gRPC response".into()))?;
            let out = DynamicMessage::decode(output, bytes).map_err(|e| RestError(Code::Internal, e.to_string()))?;
            let mut json = to_json(&out);
            let (status, with_body) = super::success::answer(route, &json, wants_body);
            if status == StatusCode::NOT_FOUND {
                return Err(RestError(Code::NotFound, format!("{}: nothing by that name to delete", route.rpc.name())));
            }
            if !with_body {
                let mut r = Resp::new(Body::empty());
                *r.status_mut() = status;
                return Ok(r);
            }
            if !route.response_body.is_empty() {
                json = json
                    .get_mut(&route.response_body)
                    .map(serde_json::Value::take)
                    .unwrap_or(serde_json::Value::Array(vec![]));
            }
            return Ok(json_response(status, &json));
        }

        // Server streaming: hold the headers until the first message or the
        // final status, so an immediate error gets its proper HTTP code.
        let first = reader.next_message().await?;
        let Some(first) = first else {
            let status = reader.finish().await;
            if let Some((code, m)) = status.filter(|(c, _)| *c != Code::Ok) {
                return Err(RestError(code, m));
            }
            return Ok(ndjson_response(Body::empty()));
        };
        if wants_raw && has_bytes_data(&output) {
            return Ok(raw_download(first, output, reader));
        }
        let body = stream_body(
            first,
            output,
            reader,
            |m| Ok::<_, Infallible>(ndjson_line(&to_json(&m))),
            |code, m| Ok(ndjson_line(&codes::error_body(code, &m))),
        );
        Ok(ndjson_response(body))
    }
}

const OCTET: &str = "application/octet-stream";
/// Oversize bodies up to this size are read and discarded before the 413.
const DRAIN_LIMIT: usize = 16 << 20;
/// Raw uploads are cut into messages of at most this size.
const RAW_CHUNK: usize = 1 << 20;

fn has_bytes_data(m: &prost_reflect::MessageDescriptor) -> bool {
    m.get_field_by_name("data").is_some_and(|f| matches!(f.kind(), Kind::Bytes) && !f.is_list())
}

/// A request path as decoded segments (percent-escapes undone, invalid
/// UTF-8 replaced), as routes are matched against.
fn path_segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

/// The request message of a (non-raw) call from its path variables, query
/// string and body. Pure, so it can be fuzzed without a server.
fn request_message(
    route: &Route,
    vars: Vec<(String, String)>,
    query: &str,
    body: &[u8],
) -> Result<DynamicMessage, RestError> {
    let input = route.rpc.input();
    let mut msg = DynamicMessage::new(input.clone());
    let body_text = std::str::from_utf8(body)
        .map_err(|_| RestError(Code::InvalidArgument, "request body is not UTF-8 JSON".into()))?
        .trim();
    match route.body.as_str() {
        "" => {
            if !body_text.is_empty() {
                return Err(RestError(Code::InvalidArgument, format!("{} takes no request body", route.rpc.name())));
            }
        }
        "*" => {
            if !body_text.is_empty() {
                msg = parse_json(input.clone(), body_text)?;
            }
        }
        field => {
            if !body_text.is_empty() {
                // One JSON value, checked before it is spliced into an
                // object: `1, "other": 2` must not set a second field.
                let mut de = serde_json::Deserializer::from_str(body_text);
                serde::de::IgnoredAny::deserialize(&mut de)
                    .and_then(|_| de.end())
                    .map_err(|e| RestError(Code::InvalidArgument, format!("invalid JSON body: {e}")))?;
                let wrapped = format!("{{\"{field}\":{body_text}}}");
                msg = parse_json(input.clone(), &wrapped)?;
            }
        }
    }
    if !query.is_empty() && route.body == "*" && !route.rpc.is_client_streaming() {
        // AIP: with body "*" every field comes from the body.
        return Err(RestError(
            Code::InvalidArgument,
            format!("{} takes its fields in the JSON body, not the query string", route.rpc.name()),
        ));
    }
    apply_query_and_path(&mut msg, &input, query, vars)?;
    Ok(msg)
}

fn apply_query_and_path(
    msg: &mut DynamicMessage,
    input: &prost_reflect::MessageDescriptor,
    query: &str,
    vars: Vec<(String, String)>,
) -> Result<(), RestError> {
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let field = input
            .get_field_by_name(&k)
            .ok_or_else(|| RestError(Code::InvalidArgument, format!("unknown query parameter {k:?}")))?;
        set_from_str(msg, &field, &v)?;
    }
    for (k, v) in vars {
        let field = input.get_field_by_name(&k).expect("checked when routes were loaded");
        set_from_str(msg, &field, &v)?;
    }
    Ok(())
}

/// gRPC frames for a raw upload: `first` (path fields, no data), then the
/// body in chunks of at most RAW_CHUNK bytes as `data`.
fn raw_body_frames(
    first: DynamicMessage,
    input: prost_reflect::MessageDescriptor,
    body: Body,
) -> impl futures::Stream<Item = Result<Bytes, axum::Error>> + Send {
    use futures::StreamExt;
    let head = futures::stream::once(async move { Ok(grpc_frames::encode(&first.encode_to_vec())) });
    let data_field = input.get_field_by_name("data").expect("checked by has_bytes_data");
    let chunks = futures::stream::unfold(
        (body.into_data_stream(), bytes::BytesMut::new(), false),
        move |(mut stream, mut buf, done)| {
            let input = input.clone();
            let data_field = data_field.clone();
            async move {
                if done && buf.is_empty() {
                    return None;
                }
                let mut finished = done;
                while !finished && buf.len() < RAW_CHUNK {
                    match stream.next().await {
                        Some(Ok(b)) => buf.extend_from_slice(&b),
                        Some(Err(e)) => return Some((Err(e), (stream, buf, true))),
                        None => finished = true,
                    }
                }
                if buf.is_empty() {
                    return None;
                }
                let take = buf.len().min(RAW_CHUNK);
                let chunk = buf.split_to(take).freeze();
                let mut m = DynamicMessage::new(input);
                m.set_field(&data_field, Value::Bytes(chunk));
                Some((Ok(grpc_frames::encode(&m.encode_to_vec())), (stream, buf, finished)))
            }
        },
    );
    head.chain(chunks)
}

/// Streams the `data` field of each message as raw bytes. An error after
/// the first byte aborts the body, so the client sees a broken transfer
/// rather than a short file.
fn raw_download(first: Bytes, output: prost_reflect::MessageDescriptor, reader: GrpcReader) -> Resp {
    let body = stream_body(
        first,
        output,
        reader,
        |m| Ok(m.get_field_by_name("data").and_then(|v| v.as_bytes().cloned()).unwrap_or_default()),
        |_, m| Err(std::io::Error::other(m)),
    );
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(OCTET));
    r
}

/// The body of a server-streaming answer: every message (the first one
/// already read) through `encode`; a failure becomes `fail`'s item and ends
/// the body.
fn stream_body<E>(
    first: Bytes,
    output: prost_reflect::MessageDescriptor,
    mut reader: GrpcReader,
    encode: impl Fn(DynamicMessage) -> Result<Bytes, E> + Send + 'static,
    fail: impl Fn(Code, String) -> Result<Bytes, E> + Send + 'static,
) -> Body
where
    E: Into<axum::BoxError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, E>>(16);
    tokio::spawn(async move {
        let mut next = Some(first);
        loop {
            let bytes = match next.take() {
                Some(b) => b,
                None => match reader.next_message().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(RestError(code, m)) => {
                        let _ = tx.send(fail(code, m)).await;
                        return;
                    }
                },
            };
            let item = match DynamicMessage::decode(output.clone(), bytes) {
                Ok(m) => encode(m),
                Err(e) => {
                    let _ = tx.send(fail(Code::Internal, e.to_string())).await;
                    return;
                }
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
        if let Some((code, m)) = reader.finish().await.filter(|(c, _)| *c != Code::Ok) {
            let _ = tx.send(fail(code, m)).await;
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn too_large(limit: usize) -> RestError {
    RestError(Code::ResourceExhausted, format!("{TOO_LARGE} the {limit}-byte limit"))
}

fn ndjson_line(v: &serde_json::Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn ndjson_response(body: Body) -> Resp {
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r
}

fn parse_json(desc: prost_reflect::MessageDescriptor, text: &str) -> Result<DynamicMessage, RestError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    let msg = DynamicMessage::deserialize_with_options(desc, &mut de, &opts)
        .map_err(|e| RestError(Code::InvalidArgument, format!("invalid JSON body: {e}")))?;
    de.end().map_err(|e| RestError(Code::InvalidArgument, format!("invalid JSON body: {e}")))?;
    Ok(msg)
}

/// Sets a field from a path or query string value.
fn set_from_str(msg: &mut DynamicMessage, field: &FieldDescriptor, raw: &str) -> Result<(), RestError> {
    let bad = |what: &str| RestError(Code::InvalidArgument, format!("invalid {}: {raw:?} is not {what}", field.name()));
    let v = match field.kind() {
        Kind::String => Value::String(raw.to_string()),
        Kind::Bool => Value::Bool(match raw {
            "true" | "1" | "" => true,
            "false" | "0" => false,
            _ => return Err(bad("a boolean")),
        }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(raw.parse().map_err(|_| bad("an integer"))?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(raw.parse().map_err(|_| bad("an integer"))?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(raw.parse().map_err(|_| bad("a non-negative integer"))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(raw.parse().map_err(|_| bad("a non-negative integer"))?),
        Kind::Float => Value::F32(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Double => Value::F64(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Enum(e) => match e.get_value_by_name(raw) {
            Some(v) => Value::EnumNumber(v.number()),
            None => Value::EnumNumber(raw.parse().map_err(|_| bad("a known enum value"))?),
        },
        Kind::Bytes | Kind::Message(_) => {
            return Err(RestError(Code::InvalidArgument, format!("{} cannot be set from the URL", field.name())));
        }
    };
    if field.is_list() {
        // In place: copying the list for every repeated parameter would make
        // a long query string quadratic.
        match msg.get_field_mut(field) {
            Value::List(l) => l.push(v),
            other => *other = Value::List(vec![v]),
        }
    } else {
        msg.set_field(field, v);
    }
    Ok(())
}

fn header_status(h: &http::HeaderMap) -> Option<(Code, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    Some((Code::from_i32(code), msg))
}

/// Reads gRPC messages and the final status out of a response body.
struct GrpcReader {
    body: Body,
    dec: grpc_frames::Decoder,
    status: Option<(Code, String)>,
}

impl GrpcReader {
    async fn next_message(&mut self) -> Result<Option<Bytes>, RestError> {
        loop {
            if let Some(m) = self.dec.next_message().map_err(|e| RestError(Code::Internal, e.into()))? {
                return Ok(Some(m));
            }
            if self.status.is_some() {
                return Ok(None);
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(RestError(Code::Internal, format!("gRPC body: {e}"))),
                Some(Ok(frame)) => {
                    if let Some(t) = frame.trailers_ref() {
                        self.status = header_status(t);
                    } else if let Ok(data) = frame.into_data() {
                        self.dec.push(&data);
                    }
                }
            }
        }
    }

    /// Drains the body and returns the final status.
    async fn finish(&mut self) -> Option<(Code, String)> {
        while self.status.is_none() {
            match self.next_message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(RestError(c, m)) => return Some((c, m)),
            }
        }
        self.status.clone()
    }
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod content_type_tests {
    use super::*;

    #[test]
    fn only_json_bodies_pass() {
        for ok in
            ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"]
        {
            assert!(check_content_type(ok, false).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "json"] {
            let e = check_content_type(bad, false).err().unwrap();
            assert_eq!(e.into_response().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        assert!(check_content_type("", true).is_ok(), "no body needs no type");
        assert_eq!(
            check_content_type("", false).err().unwrap().into_response().status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}
