//! Processes as resources of a sandbox, against a real daemon and real
//! VMs: detached jobs that outlive their client, a daemon crash and a
//! branch (each child gets its own running copy); stdin streams; a PTY over
//! gRPC and over the WebSocket route; file watching with its overflow.

mod common;

use std::time::{Duration, Instant};

use common::{branch, fork, post_ok};
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options};
use serde_json::json;
use tokio_stream::StreamExt;

const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.2; done";

async fn bake_minimal(d: &Daemon, tag: &str) {
    post_ok(d, "/v1/snapshots", json!({ "tag": tag, "image": "minimal" })).await;
    common::wait_ready(d, tag).await;
}

async fn start(d: &Daemon, id: &str, args: &[&str], tag: &str, stdin: bool) -> api::ProcessInfo {
    let req = api::StartProcessRequest {
        id: id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        tag: tag.into(),
        stdin,
        ..Default::default()
    };
    d.sandboxes().await.start_process(req).await.expect("start process").into_inner()
}

async fn info(d: &Daemon, id: &str, process: &str) -> api::ProcessInfo {
    let l = d.sandboxes().await.list_processes(api::ListProcessesRequest { id: id.into() }).await.unwrap();
    l.into_inner()
        .processes
        .into_iter()
        .find(|p| p.tag == process || p.pid.to_string() == process)
        .unwrap_or_else(|| panic!("no process {process} in {id}"))
}

/// Attaches and collects output until `done` says so (or the exit);
/// returns the text and the exit if it came.
async fn attach_until(
    d: &Daemon,
    id: &str,
    process: &str,
    from: u64,
    done: impl Fn(&str) -> bool,
) -> (String, Option<api::ExecResponse>) {
    let req = api::AttachProcessRequest { id: id.into(), process: process.into(), from_offset: from };
    let mut s = d.sandboxes().await.attach_process(req).await.expect("attach").into_inner();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, s.next()).await.expect("attach output in time");
        let Some(ev) = ev else { return (String::from_utf8_lossy(&out).into_owned(), None) };
        match ev.expect("attach event").event.unwrap() {
            api::exec_event::Event::Stdout(b) | api::exec_event::Event::Pty(b) | api::exec_event::Event::Stderr(b) => {
                out.extend(b)
            }
            api::exec_event::Event::Exit(x) => return (String::from_utf8_lossy(&out).into_owned(), Some(x)),
            _ => {}
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        if done(&text) {
            return (text, None);
        }
    }
}

fn numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Output until at least `n` more complete lines than `text` had.
fn lines_past(n: usize) -> impl Fn(&str) -> bool {
    move |t: &str| t.matches('\n').count() >= n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_jobs_survive_disconnect_daemon_crash_and_branch() {
    let mut d = Daemon::start(Options::default());
    let data = d.data_dir.clone();
    bake_minimal(&d, "m").await;
    let src = fork(&d, "m", 1).await.remove(0);

    let p = start(&d, &src, &["sh", "-c", COUNTER], "counter", false).await;
    assert!(p.pid > 0 && p.running, "{p:?}");
    // A client attaches, reads a little and goes away: the job runs on.
    let (first, _) = attach_until(&d, &src, "counter", 0, lines_past(3)).await;
    assert_eq!(&numbers(&first)[..3], &[0, 1, 2], "{first:?}");

    // The daemon dies hard and comes back: the sandbox and its job are there.
    d.crash();
    std::mem::forget(d);
    let d = Daemon::start(Options { data_dir: Some(data.clone()), ..Default::default() });
    let before = info(&d, &src, "counter").await;
    assert!(before.running, "{before:?}");
    // Attach replays from the ring (0 onwards) and then follows live.
    let (replay, _) =
        attach_until(&d, &src, "counter", 0, |t| numbers(t).len() as u64 > before.output_bytes / 2 + 8).await;
    let n = numbers(&replay);
    assert_eq!(n[0], 0);
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "replay then live, in order: {n:?}");

    // Branch the running sandbox: three children each get their own copy.
    branch(&d, &src, "b", "diff").await;
    let kids = fork(&d, "b", 3).await;
    let mut at_branch = Vec::new();
    for k in &kids {
        let pi = info(&d, k, "counter").await;
        assert!(pi.running, "{k}: {pi:?}");
        // Only new output: the child's copy is counting on.
        let (t, _) = attach_until(&d, k, "counter", pi.output_bytes, lines_past(3)).await;
        let n = numbers(&t);
        assert!(n.len() >= 2 && n.windows(2).all(|w| w[1] == w[0] + 1), "{k}: {t:?}");
        at_branch.push(n[0]);
    }
    // Stopping one child's job leaves the others' and the source's running.
    let sig = api::SignalProcessRequest { id: kids[0].clone(), process: "counter".into(), signal: "TERM".into() };
    d.sandboxes().await.signal_process(sig).await.unwrap();
    let (_, exit) = attach_until(&d, &kids[0], "counter", u64::MAX, |_| false).await;
    assert_eq!(exit.expect("exit after TERM").signal, 15);
    for id in kids[1..].iter().chain([&src]) {
        let pi = info(&d, id, "counter").await;
        assert!(pi.running, "{id} stopped with its sibling: {pi:?}");
        let (t, _) = attach_until(&d, id, "counter", pi.output_bytes, lines_past(2)).await;
        assert!(!numbers(&t).is_empty(), "{id} is not counting: {t:?}");
    }
    eprintln!("children resumed counting at {at_branch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_pty_websocket_and_file_watch() {
    let d = Daemon::start(Options::default());
    bake_minimal(&d, "m").await;
    let id = fork(&d, "m", 1).await.remove(0);
    let mut sb = d.sandboxes().await;

    // stdin: two lines through the stream; head exits 0 with them.
    start(&d, &id, &["head", "-n", "2"], "head", true).await;
    for line in ["alpha\n", "beta\n"] {
        let r = api::SendStdinRequest { id: id.clone(), process: "head".into(), data: line.into(), close: false };
        sb.send_stdin(r).await.unwrap();
    }
    let (out, exit) = attach_until(&d, &id, "head", 0, |_| false).await;
    assert_eq!((out.as_str(), exit.unwrap().exit_code), ("alpha\nbeta\n", 0));
    // close-stdin ends cat.
    start(&d, &id, &["cat"], "cat", true).await;
    sb.send_stdin(api::SendStdinRequest { id: id.clone(), process: "cat".into(), data: b"x".to_vec(), close: false })
        .await
        .unwrap();
    sb.close_stdin(api::CloseStdinRequest { id: id.clone(), process: "cat".into() }).await.unwrap();
    let (out, exit) = attach_until(&d, &id, "cat", 0, |_| false).await;
    assert_eq!((out.as_str(), exit.unwrap().exit_code), ("x", 0));
    // Bad names and signals are refused before they reach the guest.
    let bad = sb
        .signal_process(api::SignalProcessRequest { id: id.clone(), process: "../x".into(), signal: "TERM".into() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let missing = sb
        .signal_process(api::SignalProcessRequest { id: id.clone(), process: "nope".into(), signal: "TERM".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    // ExecInteractive on a PTY: typed input is echoed, the size is the one
    // asked for and follows a resize, the exit code comes back.
    let (tx, rx) = tokio::sync::mpsc::channel::<api::ExecInput>(16);
    let start_msg = api::ExecRequest {
        id: id.clone(),
        args: vec!["sh".into()],
        pty: Some(api::PtySize { rows: 30, cols: 90 }),
        tag: "shell".into(),
        ..Default::default()
    };
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Start(start_msg)) }).await.unwrap();
    let mut events =
        sb.exec_interactive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("interactive").into_inner();
    let first = events.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(api::exec_event::Event::Started(_))), "{first:?}");
    let mut screen = String::new();
    let send = |s: &str| api::ExecInput { input: Some(api::exec_input::Input::Stdin(s.as_bytes().to_vec())) };
    async fn read_until(
        events: &mut tonic::Streaming<api::ExecEvent>,
        screen: &mut String,
        want: &str,
    ) -> Option<api::ExecResponse> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !screen.contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev =
                tokio::time::timeout(left, events.next()).await.unwrap_or_else(|_| panic!("no {want:?} in {screen:?}"));
            match ev.unwrap().unwrap().event.unwrap() {
                api::exec_event::Event::Pty(b) => screen.push_str(&String::from_utf8_lossy(&b)),
                api::exec_event::Event::Exit(x) => return Some(x),
                _ => {}
            }
        }
        None
    }
    tx.send(send("stty size\r")).await.unwrap();
    read_until(&mut events, &mut screen, "30 90").await;
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Resize(api::PtySize { rows: 40, cols: 120 })) })
        .await
        .unwrap();
    tx.send(send("stty size\r")).await.unwrap();
    read_until(&mut events, &mut screen, "40 120").await;
    // Ctrl-C interrupts the foreground job, not the shell.
    tx.send(send("sleep 100\r")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(send("\x03")).await.unwrap();
    tx.send(send("echo still-$((40+2))\r")).await.unwrap();
    read_until(&mut events, &mut screen, "still-42").await;
    tx.send(send("exit 7\r")).await.unwrap();
    let exit = read_until(&mut events, &mut screen, "\u{0}never").await.expect("exit event");
    assert_eq!(exit.exit_code, 7);

    // A process that never reads its stdin holds up only its stdin: a
    // signal sent behind a pipe-full of input still ends it, and the
    // session ends with its exit, not with an input error.
    let (tx, rx) = tokio::sync::mpsc::channel::<api::ExecInput>(16);
    let start_msg = api::ExecRequest { id: id.clone(), args: vec!["sleep".into(), "100".into()], ..Default::default() };
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Start(start_msg)) }).await.unwrap();
    let mut events =
        sb.exec_interactive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("interactive").into_inner();
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Stdin(vec![b'z'; 512 << 10])) }).await.unwrap();
    tx.send(api::ExecInput { input: Some(api::exec_input::Input::Signal("INT".into())) }).await.unwrap();
    let mut exit = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), events.next()).await.expect("an exit") {
        if let Some(api::exec_event::Event::Exit(x)) = ev.expect("no input error ends the session").event {
            exit = Some(x);
        }
    }
    assert_eq!(exit.expect("exit event").signal, 2);

    // The same over the WebSocket route.
    let url = format!("ws://{}/v1/sandboxes/{id}/terminal?arg=sh&rows=12&cols=34", d.addr);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    if let Some(b) = d.bearer() {
        req.headers_mut().insert("authorization", b.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket");
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Binary(b"stty size; echo ws-$((1+1))\r".to_vec().into())).await.unwrap();
    let mut text = String::new();
    let mut exit_json = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while exit_json.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, ws.next()).await.unwrap_or_else(|_| panic!("websocket: {text:?}"));
        match m.expect("websocket open").unwrap() {
            Message::Binary(b) => {
                text.push_str(&String::from_utf8_lossy(&b));
                if text.contains("ws-2") && text.contains("12 34") && !text.contains("exit 3") {
                    ws.send(Message::Text(r#"{"stdin":"exit 3\r"}"#.into())).await.unwrap();
                    text.push_str("exit 3");
                }
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("exit").is_some() {
                    exit_json = Some(v);
                }
            }
            _ => {}
        }
    }
    assert_eq!(exit_json.unwrap()["exit"]["exit_code"], 3);

    // Watch: events under a directory, in order.
    common::sh(&d, &id, "mkdir -p /tmp/w").await;
    let w = api::WatchFilesRequest { id: id.clone(), path: "/tmp/w".into(), recursive: true };
    let mut watch = sb.watch_files(w.clone()).await.expect("watch").into_inner();
    common::sh(&d, &id, "echo one > /tmp/w/a; mkdir /tmp/w/d").await;
    common::sh(&d, &id, "echo two > /tmp/w/d/b; mv /tmp/w/a /tmp/w/c; rm /tmp/w/c").await;
    let mut seen: Vec<(i32, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|(k, p)| *k == api::file_event::Kind::Remove as i32 && p == "/tmp/w/c") {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, watch.next()).await.unwrap_or_else(|_| panic!("events so far: {seen:?}"));
        for e in m.unwrap().unwrap().events {
            seen.push((e.kind, e.path));
        }
    }
    use api::file_event::Kind as K;
    let want = [
        (K::Create, "/tmp/w/a"),
        (K::Write, "/tmp/w/a"),
        (K::Create, "/tmp/w/d"),
        (K::Create, "/tmp/w/d/b"),
        (K::Write, "/tmp/w/d/b"),
        (K::Rename, "/tmp/w/c"),
        (K::Remove, "/tmp/w/c"),
    ];
    let got: Vec<(i32, &str)> = seen.iter().map(|(k, p)| (*k, p.as_str())).collect();
    let want: Vec<(i32, &str)> = want.iter().map(|(k, p)| (*k as i32, *p)).collect();
    assert_eq!(got, want);
    // A watch on a missing directory is refused up front.
    let e = sb
        .watch_files(api::WatchFilesRequest { id: id.clone(), path: "/no/such".into(), recursive: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // A burst while the client reads nothing: events are dropped and an
    // overflow is reported, instead of anything queueing without bound.
    let mut slow = sb.watch_files(w).await.expect("watch").into_inner();
    // Long names make each event large: what the transport buffers holds
    // a few thousand of them, far fewer than the burst.
    common::sh(
        &d,
        &id,
        "cd /tmp/w; p=$(printf '%0200d' 0); i=0; while [ $i -lt 20000 ]; do : > $p$i; i=$((i+1)); done",
    )
    .await;
    let (mut overflow, mut events) = (false, 0usize);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
            Ok(Some(Ok(m))) => {
                overflow |= m.overflow;
                events += m.events.len();
            }
            Ok(other) => panic!("watch ended: {other:?}"),
            Err(_) => break,
        }
    }
    assert!(overflow, "no overflow after a 20000-file burst ({events} events delivered)");
    assert!(events < 20000, "{events} events");
    eprintln!("burst: {events} of 20000 events delivered, and an overflow");
}
