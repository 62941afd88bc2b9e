//! Servers inside sandboxes, reached over the agent channel with real VMs:
//! the HTTP proxy by sandbox and port (and by share link), WebSocket
//! through it, `forkd port-forward` and `forkd url`, gRPC OpenPort, 50
//! requests at once, a port nobody listens on, another tenant's sandbox, a
//! guest that never reads; all in sandboxes without a network device. Then
//! per-sandbox metrics: a CPU burner and a memory hog seen by
//! GetSandboxMetrics and `forkd top`, and labelled Prometheus series only
//! when enabled, never more than the cap.

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::*;
use forkd_api::v1 as api;
use forkd_integration::{Daemon, Options, TEST_TOKEN};
use serde_json::{Value, json};

const TENANT: &str = "m3Nb6Vc9Xz2Lk5Jh8Gf1Ds4Ap7Oi0UyT";

/// A WebSocket echo server (RFC 6455, unfragmented frames) from the
/// standard library only.
const WS_ECHO: &str = r#"
import base64, hashlib, socket, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            return
        data += chunk
    keys = [l.split(b":", 1)[1].strip() for l in data.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")]
    if not keys:
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nws-echo\n")
        c.close()
        return
    key = keys[0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    f = c.makefile("rb")
    while True:
        h = f.read(2)
        if len(h) < 2:
            return
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            n = int.from_bytes(f.read(2), "big")
        elif n == 127:
            n = int.from_bytes(f.read(8), "big")
        mask = f.read(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8:
            c.sendall(b"\x88\x00")
            return
        head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big"))
        c.sendall(head + payload)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Accepts connections and never reads from them.
const DEAF: &str = r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9999))
s.listen(16)
held = []
while True:
    c, _ = s.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    held.append(c)
"#;

fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("tokens.toml");
    std::fs::write(&p, format!("[[tokens]]\nname = \"team-b\"\nrole = \"tenant\"\ntoken = \"{TENANT}\"\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

async fn start_detached(d: &Daemon, id: &str, args: &[&str], tag: &str) {
    let req = api::StartProcessRequest {
        id: id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        tag: tag.into(),
        ..Default::default()
    };
    d.sandboxes().await.start_process(req).await.expect("start process");
}

/// Writes `text` to `path` in the guest.
async fn put(d: &Daemon, id: &str, path: &str, text: &str) {
    let r = d
        .http()
        .put(format!("{}/v1/sandboxes/{id}/files/content?path={path}", d.http_url()))
        .header("content-type", "application/octet-stream")
        .body(text.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "write {path}: {}", r.text().await.unwrap());
}

/// GET through the proxy until the guest server answers (it starts in the background).
async fn wait_listening(d: &Daemon, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = d.get(path).send().await.unwrap();
        if r.status() != 502 {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never answered: {}", r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ports_through_the_proxy_port_forward_and_open_port() {
    let _serial = serial().await;
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let d = Daemon::start(Options {
        token: Some(TEST_TOKEN.into()),
        extra_args: vec![
            "--tokens-file".into(),
            tokens_file(tmp.path()).display().to_string(),
            "--proxy-domain".into(),
            "preview.test".into(),
        ],
        ..Default::default()
    });
    bake(&d, "web").await;
    let sandboxes = fork_with(&d, "web", 1, json!({})).await;
    let id = sandboxes[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sandboxes[0]["network"], "none", "the channel carries it: no NIC");
    sh(&d, &id, "mkdir -p /srv && echo hello-from-the-guest > /srv/hello.txt").await;
    start_detached(&d, &id, &["python3", "-m", "http.server", "8000", "--directory", "/srv"], "web").await;
    let base = format!("/v1/sandboxes/{id}/ports/8000");
    wait_listening(&d, &format!("{base}/")).await;

    // The directory listing and a file, through the proxy.
    let r = d.get(&format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let listing = r.text().await.unwrap();
    assert!(listing.contains("hello.txt"), "{listing}");
    let r = d.get(&format!("{base}/hello.txt")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello-from-the-guest\n");
    // The bare prefix sends the client to the directory form.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}{base}", d.http_url()))
        .bearer_auth(TEST_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], format!("{base}/").as_str());
    // By host name under --proxy-domain: the whole path is the guest's.
    let r = d
        .http()
        .get(format!("{}/hello.txt", d.http_url()))
        .header("host", format!("8000-{id}.preview.test"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello-from-the-guest\n");
    // No token, no proxy.
    assert_eq!(d.anon().get(format!("{}{base}/hello.txt", d.http_url())).send().await.unwrap().status(), 401);

    // 50 requests at once all succeed.
    let client = d.http();
    let url = format!("{}{base}/hello.txt", d.http_url());
    let gets = (0..50).map(|_| {
        let (c, u) = (client.clone(), url.clone());
        async move {
            let r = c.get(u).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    });
    let answers = futures::future::join_all(gets).await;
    let ok = answers.iter().filter(|(s, b)| *s == 200 && b == "hello-from-the-guest\n").count();
    assert_eq!(ok, 50, "{:?}", answers.iter().find(|(s, _)| *s != 200));

    // Nothing listening: 502 with a clear message.
    let r = d.get(&format!("/v1/sandboxes/{id}/ports/8001/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("nothing listens on port 8001"), "{v}");
    // Bad ports and unknown sandboxes.
    assert_eq!(d.get(&format!("/v1/sandboxes/{id}/ports/0/")).send().await.unwrap().status(), 400);
    assert_eq!(d.get(&format!("/v1/sandboxes/{id}/ports/http/")).send().await.unwrap().status(), 400);
    assert_eq!(d.get("/v1/sandboxes/sb-nosuch000000/ports/8000/").send().await.unwrap().status(), 404);
    // Another tenant's sandbox is not found.
    let r = reqwest::Client::new().get(&url).bearer_auth(TENANT).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // WebSocket echo through the proxy.
    put(&d, &id, "/tmp/ws.py", WS_ECHO).await;
    start_detached(&d, &id, &["python3", "/tmp/ws.py"], "ws").await;
    wait_listening(&d, &format!("/v1/sandboxes/{id}/ports/8765/")).await;
    let ws_url = format!("ws://{}/v1/sandboxes/{id}/ports/8765/echo", d.addr);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {TEST_TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket through the proxy");
    {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        for text in ["ping-1", "a longer message that needs more than a few bytes"] {
            ws.send(Message::Text(text.into())).await.unwrap();
            let m = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("echo in time");
            assert_eq!(m.unwrap().unwrap(), Message::Text(text.into()));
        }
        ws.send(Message::Binary(vec![1u8; 1000].into())).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("echo in time");
        assert_eq!(m.unwrap().unwrap(), Message::Binary(vec![1u8; 1000].into()));
    }

    // gRPC OpenPort: raw HTTP/1.0 over the byte stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let open = api::PortTarget { id: id.clone(), port: 8000 };
    tx.send(api::PortInput { input: Some(api::port_input::Input::Open(open)) }).await.unwrap();
    let mut out =
        d.sandboxes().await.open_port(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let req = b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n".to_vec();
    tx.send(api::PortInput { input: Some(api::port_input::Input::Data(req)) }).await.unwrap();
    tx.send(api::PortInput { input: Some(api::port_input::Input::Eof(true)) }).await.unwrap();
    let mut got = Vec::new();
    let mut opened = false;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), out.message()).await.unwrap().unwrap() {
        match m.output.unwrap() {
            api::port_output::Output::Opened(_) => opened = true,
            api::port_output::Output::Data(d) => got.extend_from_slice(&d),
            api::port_output::Output::Eof(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(opened && text.starts_with("HTTP/1.0 200") && text.ends_with("hello-from-the-guest\n"), "{text}");
    drop(tx);
    // Nothing listening over gRPC: FAILED_PRECONDITION.
    let (tx2, rx2) = tokio::sync::mpsc::channel(1);
    tx2.send(api::PortInput {
        input: Some(api::port_input::Input::Open(api::PortTarget { id: id.clone(), port: 8002 })),
    })
    .await
    .unwrap();
    let e = d.sandboxes().await.open_port(tokio_stream::wrappers::ReceiverStream::new(rx2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // `forkd port-forward ID LOCAL:8000`, then curl-like requests to it.
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut pf = d
        .cli()
        .args(["port-forward", &id, &format!("{local}:8000")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(pf.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with(&format!("Forwarding from 127.0.0.1:{local} -> {id}:8000")), "{first:?}");
    for _ in 0..3 {
        let body = reqwest::get(format!("http://127.0.0.1:{local}/hello.txt")).await.unwrap().text().await.unwrap();
        assert_eq!(body, "hello-from-the-guest\n");
    }
    let _ = pf.kill();
    let _ = pf.wait();

    // `forkd url`, and a share link that needs no token until removed.
    let (code, out, err) = cli_output(&d, &["url", &id, "8000"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{}{base}/", d.http_url()));
    let (code, out, err) = cli_output(&d, &["url", &id, "8000", "--share"]);
    assert_eq!(code, 0, "{err}");
    let link = out.trim().to_string();
    assert!(link.contains("/v1/shared/"), "{link}");
    let r = d.anon().get(format!("{link}hello.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello-from-the-guest\n");
    let r = d.anon().get(format!("{}/v1/shared/not-a-real-token/hello.txt", d.http_url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (code, _, err) = cli_output(&d, &["url", &id, "8000", "--unshare"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(d.anon().get(format!("{link}hello.txt")).send().await.unwrap().status(), 404);

    // A guest that accepts and never reads: the daemon does not grow and
    // other streams keep flowing.
    put(&d, &id, "/tmp/deaf.py", DEAF).await;
    start_detached(&d, &id, &["python3", "/tmp/deaf.py"], "deaf").await;
    let mut sender = None;
    for _ in 0..100 {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let open = api::PortTarget { id: id.clone(), port: 9999 };
        tx.send(api::PortInput { input: Some(api::port_input::Input::Open(open)) }).await.unwrap();
        match d.sandboxes().await.open_port(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(s) => {
                sender = Some((tx, s));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    let (tx, _stream) = sender.expect("the deaf server listens");
    let before = rss_kib(d.pid());
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 64 << 20 {
            let chunk = vec![0x5au8; 256 * 1024];
            if tx.send(api::PortInput { input: Some(api::port_input::Input::Data(chunk)) }).await.is_err() {
                break;
            }
            sent += 256 * 1024;
        }
        sent
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..5 {
        let body = d.get(&format!("{base}/hello.txt")).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "hello-from-the-guest\n", "other streams still flow");
    }
    let v = sh(&d, &id, "echo alive").await;
    assert_eq!(v["stdout"], "alive\n");
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(grown < 32 * 1024, "the daemon grew by {grown} KiB behind a guest that does not read");
    assert!(!flood.is_finished(), "64 MiB cannot all have gone into a server that never reads");
    flood.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_sandbox_metrics_follow_cpu_and_memory() {
    let _serial = serial().await;
    let d = Daemon::start(Options { extra_args: vec!["--sandbox-metrics".into(), "2".into()], ..Default::default() });
    bake(&d, "m").await;
    let ids = fork(&d, "m", 3).await;
    let id = ids[0].clone();
    let c = d.sandboxes().await;
    let get = |id: String| {
        let mut c = c.clone();
        async move { c.get_sandbox_metrics(api::GetSandboxMetricsRequest { id }).await.unwrap().into_inner() }
    };
    let idle = get(id.clone()).await;
    assert_eq!(idle.id, id);
    assert!(idle.vmm_rss_bytes > 0 && idle.vmm_pss_bytes > 0, "{idle:?}");
    assert!(idle.guest_memory_total_bytes > 0 && idle.guest_memory_available_bytes > 0, "{idle:?}");
    assert!(idle.disk_bytes > 0 && !idle.has_nic, "{idle:?}");

    // A CPU burner: CPU time rises, and so does the share of a core.
    start_detached(&d, &id, &["sh", "-c", "while :; do :; done"], "burn").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = get(id.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = get(id.clone()).await;
    assert!(b.cpu_time_us > a.cpu_time_us + 500_000, "CPU time rises: {} → {}", a.cpu_time_us, b.cpu_time_us);
    assert!(b.cpu_percent > 30.0, "a burner uses a good part of a core: {}", b.cpu_percent);
    assert!(b.exec_count > idle.exec_count, "the process counts as a command");
    let r = d.post(&format!("/v1/sandboxes/{id}/processes/burn/signal"), json!({ "signal": "KILL" })).send().await;
    assert_eq!(r.unwrap().status(), 200);

    // A memory hog: the guest's used memory and the VMM's RSS rise.
    let before = get(id.clone()).await;
    eval(&d, &id, "hog = b'\\x01' * (96 << 20); len(hog)").await;
    let after = get(id.clone()).await;
    let used = after.guest_memory_used_bytes.saturating_sub(before.guest_memory_used_bytes);
    let rss = after.vmm_rss_bytes.saturating_sub(before.vmm_rss_bytes);
    assert!(used > 64 << 20, "guest memory rose by {used} bytes");
    assert!(rss > 64 << 20, "VMM RSS rose by {rss} bytes");

    // The same over REST and in `forkd top` / `forkd metrics`.
    let v: Value = d.get(&format!("/v1/sandboxes/{id}/metrics")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["id"], id.as_str(), "{v}");
    assert!(v.get("guest_memory_used_bytes").is_some() && v.get("cpu_time_us").is_some(), "{v}");
    let (code, out, err) = cli_output(&d, &["top", "--once", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Value = serde_json::from_str(out.trim()).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["id"] == id.as_str()).expect("the hog is listed");
    assert!(row["vmm_rss_bytes"].as_u64().unwrap() > 96 << 20, "{row}");
    assert_eq!(rows.as_array().unwrap().len(), 3);
    let (code, out, err) = cli_output(&d, &["top", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CPU%") && out.contains(&id), "{out}");
    let (code, out, err) = cli_output(&d, &["metrics", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("guest memory") && out.contains("vmm rss"), "{out}");

    // A watch samples on its interval.
    let mut w = d
        .sandboxes()
        .await
        .watch_sandbox_metrics(api::WatchSandboxMetricsRequest { id: id.clone(), interval_secs: 1 })
        .await
        .unwrap()
        .into_inner();
    let s1 = w.message().await.unwrap().unwrap();
    let s2 = w.message().await.unwrap().unwrap();
    assert!(s2.sampled_unix_ms >= s1.sampled_unix_ms + 900, "{} → {}", s1.sampled_unix_ms, s2.sampled_unix_ms);
    let e = d
        .sandboxes()
        .await
        .watch_sandbox_metrics(api::WatchSandboxMetricsRequest { id: id.clone(), interval_secs: 4000 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Labelled series: on (--sandbox-metrics 2), never more than the cap.
    let text = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    let labelled: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("forkd_sandbox_cpu_seconds{"))
        .filter_map(|l| l.split("sandbox=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labelled.len(), 2, "three sandboxes, a cap of two: {labelled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_series_are_off_by_default() {
    let _serial = serial().await;
    let d = Daemon::start(Options::default());
    post_ok(&d, "/v1/snapshots", json!({ "tag": "q", "image": "minimal" })).await;
    wait_ready(&d, "q").await;
    let _ids = fork(&d, "q", 1).await;
    let text = d.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(text.contains("forkd_sandboxes_active"), "the daemon-wide gauges are there");
    assert!(!text.contains("forkd_sandbox_cpu_seconds"), "no per-sandbox series unless enabled");
}
