//! `GET /v1/sandboxes/{id}/terminal`: a terminal over WebSocket, so a
//! browser or `websocat` can open a shell in a sandbox (or attach to one of
//! its processes) without gRPC.
//!
//! Query: `process=PID|TAG` attaches to an existing process; otherwise a
//! new one is started on a PTY from `arg=…` (repeated; default `sh`), with
//! `rows`/`cols` (default 24×80) and an optional `tag`. Messages from the
//! client: binary = input bytes; text = a JSON control message
//! (`{"stdin":"…"}`, `{"resize":{"rows":R,"cols":C}}`, `{"signal":"INT"}`,
//! `{"eof":true}`). To the client: binary = output; text = JSON
//! `{"started":{…}}` first and `{"exit":{…}}` last, then a close. The
//! process keeps running when the socket closes.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, Request};
use axum::response::{IntoResponse, Response};
use forkd_agent_protocol::v1 as pb;
use forkd_api::v1 as api;
use tonic::{Code, Status};

use crate::api::Services;
use crate::api::process;
use crate::core::Error;
use crate::core::tenants::Principal;
use crate::edge::rest::codes;

/// The route, relative to the server root.
pub const ROUTE: &str = "/v1/sandboxes/{id}/terminal";
/// Largest message a client may send.
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Default)]
struct Query {
    process: Option<String>,
    args: Vec<String>,
    rows: u32,
    cols: u32,
    tag: String,
}

fn parse_query(raw: Option<&str>) -> Result<Query, Error> {
    let mut q = Query { rows: 24, cols: 80, ..Default::default() };
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let num = |v: &str| v.parse::<u32>().map_err(|_| Error::invalid(&k, format!("{v:?} is not a number")));
        match k.as_ref() {
            "process" => q.process = Some(v.into_owned()),
            "arg" => q.args.push(v.into_owned()),
            "rows" => q.rows = num(&v)?,
            "cols" => q.cols = num(&v)?,
            "tag" => q.tag = v.into_owned(),
            other => return Err(Error::invalid(other, "unknown query parameter (process, arg, rows, cols, tag)")),
        }
    }
    if q.process.is_some() && (!q.args.is_empty() || !q.tag.is_empty()) {
        return Err(Error::invalid("process", "attach to a process or start one (arg, tag), not both"));
    }
    if q.args.is_empty() {
        q.args.push("sh".into());
    }
    Ok(q)
}

/// Validates, starts or finds the process, then upgrades.
pub async fn handle(services: Services, Path(id): Path<String>, RawQuery(raw): RawQuery, req: Request) -> Response {
    let principal = req.extensions().get::<Arc<Principal>>().cloned().unwrap_or_else(|| Arc::new(Principal::admin()));
    let (mut parts, _) = req.into_parts();
    let upgrade =
        match <WebSocketUpgrade as axum::extract::FromRequestParts<()>>::from_request_parts(&mut parts, &()).await {
            Ok(u) => u,
            Err(e) => {
                return codes::status_response(&Status::invalid_argument(format!(
                    "not a WebSocket upgrade: {}",
                    e.body_text()
                )));
            }
        };
    match prepare(&services, &principal, &id, raw.as_deref()).await {
        Ok((sb, sel)) => {
            upgrade.max_message_size(MAX_MESSAGE).on_upgrade(move |socket| serve(socket, sb, sel)).into_response()
        }
        Err(s) => codes::status_response(&s),
    }
}

async fn prepare(
    services: &Services,
    principal: &Principal,
    id: &str,
    raw: Option<&str>,
) -> Result<(Arc<crate::core::sandboxes::Sandbox>, pb::ProcSelector), Status> {
    let q = parse_query(raw)?;
    let id = services.own_sandbox(principal, id).await?;
    let sb = services.rt.agent_of(&id).await?;
    let sel = match &q.process {
        Some(p) => {
            let sel = process::selector(p)?;
            process::info(&sb, &sel).await?;
            sel
        }
        None => {
            let req = process::Start {
                args: q.args,
                env: Default::default(),
                cwd: String::new(),
                tag: q.tag,
                pty: Some(api::PtySize { rows: q.rows, cols: q.cols }),
                stdin: true,
                timeout_secs: 0,
                user: String::new(),
            }
            .into_agent_for(&services.rt, &sb)?;
            let info = sb.agent.proc_start(req, process::CONTROL_TIMEOUT).await.map_err(Error::from)?;
            pb::ProcSelector { pid: info.pid, tag: String::new() }
        }
    };
    Ok((sb, sel))
}

/// A control message in a text frame.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    stdin: Option<String>,
    resize: Option<Size>,
    signal: Option<serde_json::Value>,
    #[serde(default)]
    eof: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Size {
    rows: u32,
    cols: u32,
}

fn control_inputs(text: &str) -> Result<Vec<api::exec_input::Input>, Error> {
    use api::exec_input::Input;
    let c: Control =
        serde_json::from_str(text).map_err(|e| Error::invalid("message", format!("bad control message: {e}")))?;
    let mut out = Vec::new();
    if let Some(s) = c.stdin {
        out.push(Input::Stdin(s.into_bytes()));
    }
    if let Some(s) = c.resize {
        out.push(Input::Resize(api::PtySize { rows: s.rows, cols: s.cols }));
    }
    if let Some(sig) = c.signal {
        let s = match sig {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(Error::invalid("signal", "must be a name or a number")),
        };
        out.push(Input::Signal(s));
    }
    if c.eof {
        out.push(Input::Eof(true));
    }
    Ok(out)
}

fn json_text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error_text(e: &Status) -> Message {
    json_text(serde_json::json!({ "error": codes::error_body(e.code(), e.message()) }))
}

async fn serve(socket: WebSocket, sb: Arc<crate::core::sandboxes::Sandbox>, sel: pb::ProcSelector) {
    use futures::{SinkExt, StreamExt};
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let follow = tokio::spawn(process::follow(sb.clone(), sel.clone(), 0, true, tx));
    let (err_tx, mut err_rx) = tokio::sync::mpsc::channel::<Status>(1);
    let stdin = process::stdin_feeder(sb.clone(), sel.clone(), err_tx);
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let msg = match ev {
                    None => break,
                    Some(Err(e)) => error_text(&e),
                    Some(Ok(api::ExecEvent { event: Some(ev) })) => match ev {
                        api::exec_event::Event::Stdout(d)
                        | api::exec_event::Event::Stderr(d)
                        | api::exec_event::Event::Pty(d) => Message::Binary(d.into()),
                        api::exec_event::Event::Started(i) => json_text(serde_json::json!({ "started": {
                            "pid": i.pid, "tag": i.tag, "args": i.args, "pty": i.pty,
                        }})),
                        api::exec_event::Event::Dropped(n) => json_text(serde_json::json!({ "dropped": n })),
                        api::exec_event::Event::Exit(x) => json_text(serde_json::json!({ "exit": {
                            "exit_code": x.exit_code, "signal": x.signal, "timed_out": x.timed_out,
                        }})),
                    },
                    Some(Ok(_)) => continue,
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            Some(e) = err_rx.recv() => {
                let _ = sink.send(error_text(&e)).await;
            }
            msg = stream.next() => {
                let inputs = match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Binary(b))) => vec![api::exec_input::Input::Stdin(b.to_vec())],
                    Some(Ok(Message::Text(t))) => match control_inputs(t.as_str()) {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = sink.send(error_text(&Status::from(e))).await;
                            continue;
                        }
                    },
                    Some(Ok(_)) => continue,
                };
                for i in inputs {
                    if let Err(e) = process::apply_input(&sb, &sel, i, &stdin).await {
                        let s = Status::from(e);
                        let _ = sink.send(error_text(&s)).await;
                        if s.code() == Code::NotFound {
                            break;
                        }
                    }
                }
            }
        }
    }
    follow.abort();
    let _ = sink.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_control_messages_are_checked() {
        let q = parse_query(Some("arg=bash&arg=-l&rows=40&cols=120&tag=t1")).unwrap();
        assert_eq!((q.args, q.rows, q.cols, q.tag.as_str()), (vec!["bash".to_string(), "-l".into()], 40, 120, "t1"));
        assert_eq!(parse_query(None).unwrap().args, vec!["sh".to_string()]);
        assert!(parse_query(Some("rows=x")).is_err());
        assert!(parse_query(Some("bogus=1")).is_err());
        assert!(parse_query(Some("process=7&arg=sh")).is_err());
        assert_eq!(control_inputs(r#"{"resize":{"rows":10,"cols":20},"signal":2}"#).unwrap().len(), 2);
        assert!(control_inputs(r#"{"typo":1}"#).is_err());
        assert!(control_inputs("not json").is_err());
    }
}
