//! The code interpreter E2B's `e2b-code-interpreter` SDK talks to (port
//! 49999 in its sandbox traffic), served by the snapshot's warm Python
//! interpreter: `POST /execute` answers in NDJSON (stdout, stderr, results
//! with their representations — a matplotlib figure as PNG —, an error
//! with name, value and traceback, the execution count, the end), and
//! `/contexts` creates, lists, restarts and removes separate namespaces.
//! What Python prints streams out a line at a time while the code runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use forkd_agent_protocol::v1 as pb;
use http::{HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::Status;

use super::control::{json_response, parse, parse_json};
use super::process::Target;
use super::sandboxes;
use crate::core::Error;

/// The port the SDK names for the interpreter.
pub const PORT: u16 = 49999;
/// How long one execution may run.
const EXEC_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest piece of code accepted.
const MAX_CODE: usize = 1 << 20;
/// Contexts one sandbox may have besides the default one.
const MAX_CONTEXTS: usize = 63;
const DEFAULT: &str = "default";
/// Where code runs unless its context says otherwise (the agent's default).
const HOME: &str = "/root";

#[derive(Clone)]
struct Context {
    id: String,
    cwd: String,
    executions: u64,
}

/// The contexts of every sandbox, by sandbox id.
#[derive(Default)]
pub struct Contexts {
    map: Mutex<HashMap<String, Vec<Context>>>,
}

impl Contexts {
    fn with<T>(&self, sandbox: &str, f: impl FnOnce(&mut Vec<Context>) -> T) -> T {
        let mut map = self.map.lock().unwrap();
        let list = map
            .entry(sandbox.to_string())
            .or_insert_with(|| vec![Context { id: DEFAULT.into(), cwd: HOME.into(), executions: 0 }]);
        f(list)
    }

    /// Forgets a sandbox's contexts (it was killed).
    pub fn forget(&self, sandbox: &str) {
        self.map.lock().unwrap().remove(sandbox);
    }
}

fn context_json(c: &Context) -> Value {
    json!({ "id": c.id, "language": "python", "cwd": c.cwd })
}

fn check_language(l: &Option<String>) -> Result<(), Status> {
    match l.as_deref() {
        None | Some("") | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(Status::invalid_argument(format!(
            "language {other:?} is not available: forkd's interpreter runs python"
        ))),
    }
}

#[derive(Deserialize)]
struct ExecuteBody {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct ContextBody {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// Serves one interpreter request.
pub async fn handle(
    t: Target<'_>,
    contexts: &Contexts,
    method: &Method,
    path: &str,
    body: Bytes,
) -> Result<Response, Status> {
    let segments: Vec<&str> = path.trim_end_matches('/').rsplit('/').take(3).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["execute", ..]) => execute(t, contexts, parse_json(&body)?).await,
        (&Method::POST, ["contexts", ..]) => {
            let b: ContextBody = parse(&body)?;
            check_language(&b.language)?;
            let cwd = b.cwd.unwrap_or_else(|| HOME.into());
            if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > 4096 {
                return Err(Status::invalid_argument(format!("cwd {cwd:?} must be an absolute guest path")));
            }
            sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let ctx = Context { id: crate::core::ids::random_name(16), cwd, executions: 0 };
            contexts.with(t.sandbox, |list| {
                if list.len() > MAX_CONTEXTS {
                    return Err(Status::resource_exhausted(format!("{MAX_CONTEXTS} contexts exist; remove one first")));
                }
                list.push(ctx.clone());
                Ok(())
            })?;
            Ok(json_response(StatusCode::OK, &context_json(&ctx)))
        }
        (&Method::GET, ["contexts", ..]) => {
            sandboxes::live(t.services, t.principal, t.sandbox).await?;
            let list = contexts.with(t.sandbox, |l| l.iter().map(context_json).collect::<Vec<_>>());
            Ok(json_response(StatusCode::OK, &Value::Array(list)))
        }
        (&Method::DELETE, [id, "contexts", ..]) => {
            let id = id.to_string();
            drop_namespace(&t, &id).await?;
            contexts.with(t.sandbox, |l| l.retain(|c| c.id != id || c.id == DEFAULT));
            Ok(json_response(StatusCode::OK, &json!({})))
        }
        (&Method::POST, ["restart", id, "contexts"]) => {
            let id = id.to_string();
            drop_namespace(&t, &id).await?;
            contexts.with(t.sandbox, |l| {
                if let Some(c) = l.iter_mut().find(|c| c.id == id) {
                    c.executions = 0;
                }
            });
            Ok(json_response(StatusCode::OK, &json!({})))
        }
        _ => Err(Status::not_found(format!("{method} {path} is not part of the code interpreter's API"))),
    }
}

/// The runtime namespace of a context id ("" for the default one).
fn namespace(id: &str) -> String {
    if id == DEFAULT { String::new() } else { format!("e2b-{id}") }
}

async fn drop_namespace(t: &Target<'_>, id: &str) -> Result<(), Status> {
    let (sb, _) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let req = pb::EvalRequest { context: namespace(id), drop_context: true, ..Default::default() };
    sb.agent.eval(req, Duration::from_secs(30)).await.map_err(Error::from)?;
    Ok(())
}

async fn execute(t: Target<'_>, contexts: &Contexts, b: ExecuteBody) -> Result<Response, Status> {
    if b.code.len() > MAX_CODE {
        return Err(Status::invalid_argument(format!("code exceeds {MAX_CODE} bytes")));
    }
    if b.context_id.is_some() && b.language.is_some() {
        return Err(Status::invalid_argument("give a context or a language, not both"));
    }
    check_language(&b.language)?;
    let ctx_id = b.context_id.unwrap_or_else(|| DEFAULT.into());
    let ctx = contexts
        .with(t.sandbox, |l| l.iter().find(|c| c.id == ctx_id).cloned())
        .ok_or_else(|| Status::not_found(format!("context {ctx_id:?} not found")))?;
    let (sb, ws) = sandboxes::live(t.services, t.principal, t.sandbox).await?;
    let mut env: HashMap<String, String> = ws.map(|w| w.env.into_iter().collect()).unwrap_or_default();
    env.extend(b.env_vars.unwrap_or_default());
    let req = pb::EvalRequest {
        code: b.code,
        timeout_ms: EXEC_TIMEOUT.as_millis() as u32,
        context: namespace(&ctx.id),
        rich: true,
        env,
        cwd: ctx.cwd.clone(),
        drop_context: false,
        stream: true,
    };
    sb.touch();
    let count = contexts
        .with(t.sandbox, |l| {
            l.iter_mut().find(|c| c.id == ctx.id).map(|c| {
                c.executions += 1;
                c.executions
            })
        })
        .unwrap_or(1);
    // Printed output goes out as it comes; the rest when the code is done.
    // A client that goes away stops reading, not the code.
    let (lines_tx, lines_rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let (out_tx, mut out_rx) = mpsc::channel::<pb::EvalOutput>(256);
        let send = |v: Value| {
            let tx = lines_tx.clone();
            async move {
                let _ = tx.send(Ok(ndjson_line(&v))).await;
            }
        };
        let eval = sb.agent.eval_streamed(req, EXEC_TIMEOUT + Duration::from_secs(10), &out_tx);
        tokio::pin!(eval);
        let result = loop {
            tokio::select! {
                r = &mut eval => break r,
                Some(o) = out_rx.recv() => send(output_line(&o)).await,
            }
        };
        while let Ok(o) = out_rx.try_recv() {
            send(output_line(&o)).await;
        }
        let rest = match result {
            Ok(r) => lines(&r, count),
            Err(e) => {
                let msg = Error::from(e).to_string();
                vec![
                    json!({ "type": "error", "name": "RuntimeError", "value": msg, "traceback": msg }),
                    json!({ "type": "end_of_execution" }),
                ]
            }
        };
        for v in rest {
            send(v).await;
        }
    });
    let mut r = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(lines_rx)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(r)
}

/// A streamed piece of printed output as the SDK's line.
fn output_line(o: &pb::EvalOutput) -> Value {
    let kind = if o.stream == pb::eval_output::Stream::Stderr as i32 { "stderr" } else { "stdout" };
    json!({ "type": kind, "text": o.text, "timestamp": now_ns() })
}

/// One NDJSON line: an object and a newline, never a blank line (the SDK
/// parses each).
fn ndjson_line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The NDJSON lines of one execution, in the order the SDK reads them.
fn lines(r: &pb::EvalResult, count: u64) -> Vec<Value> {
    let mut out = vec![];
    let ts = now_ns();
    if !r.stdout.is_empty() {
        out.push(json!({ "type": "stdout", "text": r.stdout, "timestamp": ts }));
    }
    if !r.stderr.is_empty() {
        out.push(json!({ "type": "stderr", "text": r.stderr, "timestamp": ts }));
    }
    for res in &r.results {
        let mut line = serde_json::Map::new();
        line.insert("type".into(), json!("result"));
        for (k, v) in &res.data {
            // `json` is an object to the SDK, the rest strings.
            let value = if k == "json" { serde_json::from_str(v).unwrap_or(json!(v)) } else { json!(v) };
            line.insert(k.clone(), value);
        }
        line.insert("is_main_result".into(), json!(res.main));
        out.push(Value::Object(line));
    }
    if r.exit_code != 0 {
        let (name, value) = match r.exit_code {
            2 => ("RuntimeError".to_string(), r.error.clone()),
            _ if r.error_name.is_empty() => ("Error".to_string(), r.error.trim().to_string()),
            _ => (r.error_name.clone(), r.error_value.clone()),
        };
        out.push(json!({ "type": "error", "name": name, "value": value, "traceback": r.error }));
    }
    out.push(json!({ "type": "number_of_executions", "execution_count": count }));
    out.push(json!({ "type": "end_of_execution" }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_become_the_sdks_lines() {
        let r = pb::EvalResult {
            stdout: "hi\n".into(),
            exit_code: 1,
            error: "Traceback ...\nZeroDivisionError: division by zero\n".into(),
            error_name: "ZeroDivisionError".into(),
            error_value: "division by zero".into(),
            results: vec![pb::RichResult {
                data: [("text".to_string(), "2".to_string()), ("json".to_string(), "{\"a\": 1}".to_string())]
                    .into_iter()
                    .collect(),
                main: true,
            }],
            ..Default::default()
        };
        let l = lines(&r, 3);
        let types: Vec<&str> = l.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["stdout", "result", "error", "number_of_executions", "end_of_execution"]);
        assert_eq!(l[1]["json"]["a"], 1);
        assert_eq!(l[1]["is_main_result"], true);
        assert_eq!(l[2]["name"], "ZeroDivisionError");
        assert_eq!(l[3]["execution_count"], 3);
    }

    #[test]
    fn only_python_is_offered() {
        assert!(check_language(&None).is_ok());
        assert!(check_language(&Some("python".into())).is_ok());
        assert_eq!(check_language(&Some("r".into())).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
