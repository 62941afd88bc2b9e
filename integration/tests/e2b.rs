//! E2B's wire protocols at the byte level, against a real daemon and real
//! VMs (the SDK suites in clients/ cover the JSON the SDKs send): the
//! control API with `X-API-Key`, envd's Connect protocol in its binary
//! encoding, keepalives at the interval the client asks for, a Connect
//! timeout that ends the stream while the process runs on, and errors in
//! the shapes the SDKs parse.

mod common;

use forkd_api::e2b::process as pr;
use forkd_integration::{Daemon, Options};
use prost::Message;
use serde_json::{Value, json};

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![flags];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The envelopes of a stream body: (flags, payload).
fn envelopes(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = vec![];
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert!(body.len() >= 5 + len, "a truncated envelope");
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "bytes after the last envelope");
    out
}

struct Sbx<'a> {
    d: &'a Daemon,
    id: String,
    token: String,
}

impl Sbx<'_> {
    fn rpc(&self, method: &str, content_type: &str) -> reqwest::RequestBuilder {
        self.d
            .anon()
            .post(format!("{}/process.Process/{method}", self.d.http_url()))
            .header("e2b-sandbox-id", &self.id)
            .header("e2b-sandbox-port", "49983")
            .header("x-access-token", &self.token)
            .header("connect-protocol-version", "1")
            .header("content-type", content_type)
    }

    async fn start(&self, script: &str, headers: &[(&str, &str)]) -> Vec<pr::ProcessEvent> {
        let req = pr::StartRequest {
            process: Some(pr::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut rb = self.rpc("Start", "application/connect+proto").body(envelope(0, &req.encode_to_vec()));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/connect+proto");
        let frames = envelopes(&r.bytes().await.unwrap());
        let (last_flags, last) = frames.last().cloned().expect("an end-of-stream envelope");
        assert_eq!(last_flags, 2, "the stream ends with an end-of-stream envelope");
        let end: Value = serde_json::from_slice(&last).unwrap();
        let mut events: Vec<pr::ProcessEvent> = frames[..frames.len() - 1]
            .iter()
            .map(|(f, p)| {
                assert_eq!(*f, 0);
                pr::StartResponse::decode(p.as_slice()).unwrap().event.unwrap()
            })
            .collect();
        if let Some(err) = end.get("error") {
            // Carried as a synthetic last event for the caller to inspect.
            events.push(pr::ProcessEvent {
                event: Some(pr::process_event::Event::End(pr::process_event::EndEvent {
                    exit_code: -1000,
                    status: err["code"].as_str().unwrap_or("").to_string(),
                    ..Default::default()
                })),
            });
        }
        events
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn e2b_wire_protocol() {
    let d = Daemon::start(Options::default());
    common::post_ok(&d, "/v1/snapshots", json!({ "tag": "e2bm", "image": "minimal" })).await;
    common::wait_ready(&d, "e2bm").await;
    let token = d.bearer().unwrap().trim_start_matches("Bearer ").to_string();
    let api = |path: &str| format!("{}/e2b{path}", d.http_url());

    // The control API takes the key as E2B sends it.
    let r = d
        .anon()
        .post(api("/v2/sandboxes"))
        .header("x-api-key", &token)
        .json(&json!({ "templateID": "e2bm", "timeout": 120, "metadata": { "k": "v" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(created["envdAccessToken"], token.as_str());
    assert_eq!(created["templateID"], "e2bm");
    let s = Sbx { d: &d, id: id.clone(), token: token.clone() };

    // No key: E2B's error shape.
    let r = d.anon().get(api(&format!("/sandboxes/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], 401);

    // A stream in the binary encoding with keepalives every second.
    let events = s.start("sleep 2.5; echo done", &[("keepalive-ping-interval", "1")]).await;
    use pr::process_event::Event;
    assert!(matches!(events.first(), Some(pr::ProcessEvent { event: Some(Event::Start(st)) }) if st.pid > 0));
    let keepalives = events.iter().filter(|e| matches!(e.event, Some(Event::Keepalive(_)))).count();
    assert!(keepalives >= 1, "keepalives while the process was quiet: {events:?}");
    let out: Vec<u8> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Data(pr::process_event::DataEvent {
                output: Some(pr::process_event::data_event::Output::Stdout(d)),
            })) => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(out, b"done\n");
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::End(end)) => {
            assert_eq!((end.exit_code, end.exited, end.status.as_str()), (0, true, "exit status 0"))
        }
        other => panic!("no end event: {other:?}"),
    }

    // The client's Connect timeout ends the stream; the process runs on.
    let events = s.start("sleep 60", &[("connect-timeout-ms", "1500")]).await;
    let pid = match &events[0].event {
        Some(Event::Start(st)) => st.pid,
        other => panic!("no start event: {other:?}"),
    };
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::End(end)) => assert_eq!((end.exit_code, end.status.as_str()), (-1000, "deadline_exceeded")),
        other => panic!("the stream did not end with the deadline: {other:?}"),
    }
    // A unary call in the binary encoding: the process is still there.
    let r = s.rpc("List", "application/proto").body(pr::ListRequest {}.encode_to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/proto");
    let listed = pr::ListResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert!(listed.processes.iter().any(|p| p.pid == pid), "{listed:?}");
    let kill = pr::SendSignalRequest {
        process: Some(pr::ProcessSelector { selector: Some(pr::process_selector::Selector::Pid(pid)) }),
        signal: pr::Signal::Sigkill as i32,
    };
    let r = s.rpc("SendSignal", "application/proto").body(kill.encode_to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A malformed message is INVALID_ARGUMENT and changes nothing.
    let r = s.rpc("SendSignal", "application/json").body("{\"process\": 7}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_argument");

    // An unknown sandbox: "not found" as the SDKs recognise it, unary and streaming.
    let other = Sbx { d: &d, id: "inosuchsandbox000000".into(), token: token.clone() };
    let r = other.rpc("List", "application/json").body("{}").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    assert!(body["message"].as_str().unwrap().contains("was not found"), "{body}");
    let events = other.start("true", &[]).await;
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::End(end)) => assert_eq!(end.status, "unavailable"),
        other => panic!("{other:?}"),
    }
    let r = d
        .anon()
        .get(format!("{}/health", d.http_url()))
        .header("e2b-sandbox-id", "inosuchsandbox000000")
        .header("x-access-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);

    // Killed, then gone: 404 in E2B's shape.
    let r = d.anon().delete(api(&format!("/sandboxes/{id}"))).header("x-api-key", &token).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = d.anon().delete(api(&format!("/sandboxes/{id}"))).header("x-api-key", &token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], 404);
}
