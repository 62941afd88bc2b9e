//! End-to-end tests of the request handling over a socket pair, the way the
//! host talks to the agent (minus the VM).

use crate::runtime::Runtime;
use crate::server::{self, Agent};
use crate::sys;
use forkd_agent_protocol::v1::{
    CancelRequest, EvalRequest, ExecRequest, PingRequest, ReadFileRequest, ReinitRequest, Request, Response,
    WriteFileRequest, agent_error::Kind, request::Body as Req, response::Body as Resp,
};
use forkd_agent_protocol::{FrameDecoder, encode_frame};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

struct Client {
    sock: UnixStream,
    dec: FrameDecoder,
    next_id: u64,
}

impl Client {
    fn start(runtime: Arc<Runtime>) -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        let run_dir = std::env::temp_dir().join(format!("forkd-agent-run-{}", std::process::id()));
        let agent = Agent::new(runtime, &run_dir.to_string_lossy());
        std::thread::spawn(move || {
            let fd: OwnedFd = b.into();
            sys::set_nonblocking(fd.as_raw_fd()).unwrap();
            let fd = Arc::new(fd);
            agent.writer.set(Some(fd.clone()));
            server::serve(&agent, fd.as_raw_fd(), false);
        });
        a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client { sock: a, dec: FrameDecoder::new(), next_id: 1 }
    }

    fn send(&mut self, body: Req) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.sock.write_all(&encode_frame(&Request { id, body: Some(body) })).unwrap();
        id
    }

    fn recv(&mut self) -> Response {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(r) = self.dec.next_message::<Response>().unwrap() {
                return r;
            }
            let n = self.sock.read(&mut buf).expect("agent answers");
            assert!(n > 0, "agent closed the connection");
            self.dec.push(&buf[..n]);
        }
    }

    fn call(&mut self, body: Req) -> Resp {
        let id = self.send(body);
        let r = self.recv();
        assert_eq!(r.id, id);
        r.body.unwrap()
    }

    /// Runs an exec; returns (stdout, stderr, final frame).
    fn exec(&mut self, req: ExecRequest) -> (String, String, Resp) {
        let id = self.send(Req::Exec(req));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let r = self.recv();
            assert_eq!(r.id, id);
            match r.body.unwrap() {
                Resp::ExecOutput(o) if o.stream == 0 => out.extend(o.data),
                Resp::ExecOutput(o) => err.extend(o.data),
                other => {
                    return (String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap(), other);
                }
            }
        }
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn ping_exec_and_errors() {
    let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
    match c.call(Req::Ping(PingRequest {})) {
        Resp::Pong(p) => {
            assert!(!p.runtime_ready);
            assert_eq!(p.runtime, "");
            assert!(!p.agent_version.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }

    let (out, err, end) =
        c.exec(ExecRequest { args: args(&["sh", "-c", "echo out; echo err >&2; exit 7"]), ..Default::default() });
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    let Resp::ExecExit(x) = end else { panic!("{end:?}") };
    assert_eq!((x.exit_code, x.signal, x.timed_out), (7, 0, false));

    let mut env = std::collections::HashMap::new();
    env.insert("GREETING".to_string(), "hi".to_string());
    let (out, _, _) = c.exec(ExecRequest {
        args: args(&["sh", "-c", "read l; echo \"$GREETING $l $(pwd)\""]),
        env,
        cwd: "/tmp".into(),
        stdin: b"there\n".to_vec(),
        ..Default::default()
    });
    assert_eq!(out, "hi there /tmp\n");

    let (_, _, end) = c.exec(ExecRequest { args: args(&["sleep", "10"]), timeout_ms: 200, ..Default::default() });
    let Resp::ExecExit(x) = end else { panic!("{end:?}") };
    assert!(x.timed_out);
    assert_eq!((x.exit_code, x.signal), (-1, libc::SIGKILL));
    assert!(x.duration_us < 5_000_000);

    let (_, _, end) = c.exec(ExecRequest { args: args(&["no-such-program-xyz"]), ..Default::default() });
    let Resp::Error(e) = end else { panic!("{end:?}") };
    assert_eq!(e.kind, Kind::NotFound as i32);

    let (_, _, end) = c.exec(ExecRequest { args: vec![], ..Default::default() });
    let Resp::Error(e) = end else { panic!("{end:?}") };
    assert_eq!(e.kind, Kind::Invalid as i32);

    match c.call(Req::Eval(EvalRequest { code: "1".into(), timeout_ms: 0, ..Default::default() })) {
        Resp::EvalResult(r) => assert_eq!(r.exit_code, 2),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn cancel_kills_exec() {
    let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
    let id =
        c.send(Req::Exec(ExecRequest { args: args(&["sh", "-c", "echo started; sleep 30"]), ..Default::default() }));
    let first = c.recv();
    assert_eq!(first.id, id);
    let cancel_id = c.send(Req::Cancel(CancelRequest { target_id: id }));
    let mut acked = false;
    let mut exited = false;
    while !(acked && exited) {
        let r = c.recv();
        match r.body.unwrap() {
            Resp::Ack(_) => {
                assert_eq!(r.id, cancel_id);
                acked = true;
            }
            Resp::ExecExit(x) => {
                assert_eq!(r.id, id);
                assert_eq!(x.signal, libc::SIGKILL);
                exited = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    match c.call(Req::Cancel(CancelRequest { target_id: 999 })) {
        Resp::Error(e) => assert_eq!(e.kind, Kind::NotFound as i32),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn files_round_trip_and_garbage_is_skipped() {
    let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
    // Garbage before a frame (as after a restore mid-stream) is skipped.
    c.sock.write_all(b"\x00\x01FKgarbage").unwrap();
    let path = std::env::temp_dir().join(format!("forkd-agent-e2e-{}", std::process::id()));
    let p = path.to_string_lossy().to_string();
    let w = |data: &[u8], offset, first, last| {
        Req::WriteFile(WriteFileRequest {
            path: p.clone(),
            offset,
            data: data.to_vec(),
            first,
            last,
            mode: 0o640,
            upload_id: "t".into(),
        })
    };
    assert!(matches!(c.call(w(b"abc", 0, true, false)), Resp::Ack(_)));
    assert!(matches!(c.call(w(b"def", 3, false, true)), Resp::Ack(_)));
    match c.call(Req::ReadFile(ReadFileRequest { path: p.clone(), offset: 0, length: 0 })) {
        Resp::FileData(d) => {
            assert_eq!(d.data, b"abcdef");
            assert!(d.eof);
            assert_eq!(d.size, 6);
        }
        other => panic!("unexpected {other:?}"),
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_stale_fragment_does_not_swallow_the_next_frame() {
    let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
    c.sock.write_all(b"FKD1\x32\x00\x00\x00partial").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(c.call(Req::Ping(PingRequest {})), Resp::Pong(_)));
}

#[test]
fn reinit_without_privileged_parts() {
    let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
    match c.call(Req::Reinit(ReinitRequest { sandbox_id: "sb-1".into(), ..Default::default() })) {
        Resp::ReinitDone(d) => {
            assert!(!d.runtime_reseeded);
            assert_eq!(d.clock_step_nanos, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    match c.call(Req::Ping(PingRequest {})) {
        Resp::Pong(p) => assert_eq!(p.sandbox_id, "sb-1"),
        other => panic!("unexpected {other:?}"),
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("forkd-agent-run-{}", std::process::id())));
}

#[test]
fn python_runtime_keeps_state() {
    if crate::proc::resolve_program("python3", crate::exec::DEFAULT_PATH).is_none() {
        eprintln!("no python3 on this host; skipped");
        return;
    }
    let dir = std::env::temp_dir().join(format!("forkd-agent-rt-{}", std::process::id()));
    let rt = Runtime::new("python", vec!["json".into()], &dir.to_string_lossy());
    rt.start_background();
    let mut c = Client::start(rt.clone());
    let eval = |c: &mut Client, code: &str, timeout_ms| match c.call(Req::Eval(EvalRequest {
        code: code.into(),
        timeout_ms,
        ..Default::default()
    })) {
        Resp::EvalResult(r) => r,
        other => panic!("unexpected {other:?}"),
    };
    let r = eval(&mut c, "x = 41", 0);
    assert_eq!((r.exit_code, r.result.as_str()), (0, ""), "{r:?}");
    assert!(rt.ready());
    assert_eq!(eval(&mut c, "x", 0).result, "41");
    assert_eq!(eval(&mut c, "json.dumps({'a': x})", 0).result, "'{\"a\": 41}'");
    let r = eval(&mut c, "print('p')\n1/0", 0);
    assert_eq!(r.exit_code, 1);
    assert_eq!(r.stdout, "p\n");
    assert!(r.error.contains("ZeroDivisionError"));
    let r = eval(&mut c, "while True: pass", 300);
    assert_eq!(r.exit_code, 124);
    assert_eq!(eval(&mut c, "x", 0).result, "41", "state survives an interpreter-side timeout");
    assert!(rt.reseed(&[7u8; 32]));
    let _ = std::fs::remove_dir_all(&dir);
}

mod processes {
    use super::*;
    use forkd_agent_protocol::v1::{
        ProcAttachRequest, ProcInputRequest, ProcListRequest, ProcResizeRequest, ProcSelector, ProcSignalRequest,
        ProcStartRequest, PtySize, WatchRequest, file_event::Kind as EventKind,
    };

    fn by_tag(t: &str) -> Option<ProcSelector> {
        Some(ProcSelector { pid: 0, tag: t.into() })
    }

    fn start(c: &mut Client, req: ProcStartRequest) -> u32 {
        match c.call(Req::ProcStart(req)) {
            Resp::ProcInfo(i) => i.pid,
            other => panic!("start: {other:?}"),
        }
    }

    /// Attaches and reads until the exit; returns (output, exit code).
    fn attach_all(c: &mut Client, sel: Option<ProcSelector>, from: u64) -> (String, i32) {
        let id = c.send(Req::ProcAttach(ProcAttachRequest { process: sel, from_offset: from }));
        let mut out = Vec::new();
        loop {
            let r = c.recv();
            assert_eq!(r.id, id);
            match r.body.unwrap() {
                Resp::ProcOutput(o) => {
                    out.extend(o.data);
                    if let Some(x) = o.exit {
                        return (String::from_utf8_lossy(&out).into_owned(), x.exit_code);
                    }
                }
                other => panic!("attach: {other:?}"),
            }
        }
    }

    #[test]
    fn stdin_stream_feeds_head_and_close_ends_cat() {
        let mut c = Client::start(Runtime::new("", vec![], "/tmp"));
        start(
            &mut c,
            ProcStartRequest {
                args: args(&["head", "-n", "2"]),
                tag: "head".into(),
                stdin: true,
                ..Default::default()
            },
        );
        for line in ["one\n", "two\n"] {
            let r =
                c.call(Req::ProcInput(ProcInputRequest { process: by_tag("head"), data: line.into(), close: false }));
            assert!(matches!(r, Resp::ProcInputDone(ref d) if d.written == line.len() as u64), "{r:?}");
        }
        assert_eq!(attach_all(&mut c, by_tag("head"), 0), ("one\ntwo\n".into(), 0));

        start(&mut c, ProcStartRequest { args: args(&["cat"]), tag: "cat".into(), stdin: true, ..Default::default() });
        c.call(Req::ProcInput(ProcInputRequest { process: by_tag("cat"), data: b"hi".to_vec(), close: true }));
        assert_eq!(attach_all(&mut c, by_tag("cat"), 0), ("hi".into(), 0));
        // Input to a process without stdin is refused with a reason.
        start(&mut c, ProcStartRequest { args: args(&["sleep", "5"]), tag: "nostdin".into(), ..Default::default() });
        match c.call(Req::ProcInput(ProcInputRequest { process: by_tag("nostdin"), data: b"x".to_vec(), close: false }))
        {
            Resp::Error(e) => assert!(e.message.contains("stdin"), "{}", e.message),
            other => panic!("{other:?}"),
        }
        c.call(Req::ProcSignal(ProcSignalRequest { process: by_tag("nostdin"), signal: 9 }));
        assert_eq!(attach_all(&mut c, by_tag("nostdin"), 0).1, -1);
    }

    #[test]
    fn detached_output_is_replayed_from_the_ring_and_tags_are_unique() {
        let mut c = Client::start(Runtime::new("", vec![], "/tmp"));
        let pid = start(
            &mut c,
            ProcStartRequest {
                args: args(&["sh", "-c", "for i in 1 2 3; do echo $i; done; exit 4"]),
                tag: "count".into(),
                ..Default::default()
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        let (out, code) = attach_all(&mut c, Some(ProcSelector { pid, tag: String::new() }), 0);
        assert_eq!((out.as_str(), code), ("1\n2\n3\n", 4));
        // A second attach replays again; one from an offset skips.
        assert_eq!(attach_all(&mut c, by_tag("count"), 2).0, "2\n3\n");
        match c.call(Req::ProcList(ProcListRequest {})) {
            Resp::ProcTable(t) => {
                let p = t.processes.iter().find(|p| p.tag == "count").unwrap();
                assert_eq!(p.output_bytes, 6);
                assert_eq!(p.exit.unwrap().exit_code, 4);
            }
            other => panic!("{other:?}"),
        }
        start(&mut c, ProcStartRequest { args: args(&["sleep", "5"]), tag: "dup".into(), ..Default::default() });
        match c.call(Req::ProcStart(ProcStartRequest {
            args: args(&["true"]),
            tag: "dup".into(),
            ..Default::default()
        })) {
            Resp::Error(e) => assert_eq!(e.kind, Kind::Exists as i32),
            other => panic!("{other:?}"),
        }
        c.call(Req::ProcSignal(ProcSignalRequest { process: by_tag("dup"), signal: 15 }));
        match c.call(Req::ProcAttach(ProcAttachRequest { process: by_tag("missing"), from_offset: 0 })) {
            Resp::Error(e) => assert_eq!(e.kind, Kind::NotFound as i32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pty_has_the_size_and_follows_resizes() {
        let mut c = Client::start(Runtime::new("", vec![], "/tmp"));
        if !std::path::Path::new("/dev/ptmx").exists() {
            panic!("no /dev/ptmx on this host");
        }
        start(
            &mut c,
            ProcStartRequest {
                args: args(&["sh", "-c", "stty size; read x; stty size"]),
                tag: "tty".into(),
                pty: Some(PtySize { rows: 33, cols: 101 }),
                ..Default::default()
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        c.call(Req::ProcResize(ProcResizeRequest {
            process: by_tag("tty"),
            size: Some(PtySize { rows: 20, cols: 60 }),
        }));
        c.call(Req::ProcInput(ProcInputRequest { process: by_tag("tty"), data: b"go\r".to_vec(), close: false }));
        let (out, code) = attach_all(&mut c, by_tag("tty"), 0);
        assert_eq!(code, 0);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(out.contains("20 60"), "{out:?}");
    }

    #[test]
    fn watch_reports_create_write_rename_remove_in_order() {
        let mut c = Client::start(Runtime::new("", vec![], "/tmp"));
        let dir = tempfile_dir();
        let id = c.send(Req::Watch(WatchRequest { path: dir.clone(), recursive: true }));
        let armed = c.recv();
        assert_eq!(armed.id, id);
        assert!(matches!(armed.body, Some(Resp::WatchEvents(_))));
        std::fs::create_dir(format!("{dir}/sub")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(format!("{dir}/sub/a"), b"1").unwrap();
        std::fs::rename(format!("{dir}/sub/a"), format!("{dir}/sub/b")).unwrap();
        std::fs::remove_file(format!("{dir}/sub/b")).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            match c.recv().body.unwrap() {
                Resp::WatchEvents(w) => {
                    for e in w.events {
                        seen.push((
                            EventKind::try_from(e.kind).unwrap(),
                            e.path.replace(&dir, ""),
                            e.from.replace(&dir, ""),
                        ));
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        let want = [
            (EventKind::Create, "/sub", ""),
            (EventKind::Create, "/sub/a", ""),
            (EventKind::Write, "/sub/a", ""),
            (EventKind::Rename, "/sub/b", "/sub/a"),
            (EventKind::Remove, "/sub/b", ""),
        ];
        let got: Vec<(EventKind, &str, &str)> = seen.iter().map(|(k, p, f)| (*k, p.as_str(), f.as_str())).collect();
        assert_eq!(got, want);
        c.call(Req::Cancel(CancelRequest { target_id: id }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> String {
        let d = std::env::temp_dir().join(format!("forkd-watch-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d.to_string_lossy().into_owned()
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        sys::getrandom(&mut b).unwrap();
        u64::from_le_bytes(b)
    }
}

mod port_streams {
    use super::*;
    use forkd_agent_protocol::v1::{PortEvent, PortOpenRequest, PortSendRequest};
    use std::net::TcpListener;

    fn open(c: &mut Client, port: u16, window: u32) -> u64 {
        let id = c.send(Req::PortOpen(PortOpenRequest { port: port as u32, window }));
        match c.recv().body.unwrap() {
            Resp::PortEvent(PortEvent { opened: true, grant, .. }) => assert!(grant > 0),
            other => panic!("not opened: {other:?}"),
        }
        id
    }

    fn event(c: &mut Client, id: u64) -> PortEvent {
        loop {
            let r = c.recv();
            if r.id != id {
                continue;
            }
            match r.body.unwrap() {
                Resp::PortEvent(e) => return e,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn bytes_flow_both_ways_and_half_close_ends_the_stream() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // An upper-casing server that answers once its input ends.
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            s.write_all(&all.to_ascii_uppercase()).unwrap();
        });
        let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
        let id = open(&mut c, port, 1 << 20);
        c.send(Req::PortSend(PortSendRequest { target_id: id, data: b"hello ".to_vec(), ..Default::default() }));
        c.send(Req::PortSend(PortSendRequest { target_id: id, data: b"port".to_vec(), eof: true, grant: 0 }));
        let (mut got, mut granted) = (Vec::new(), 0);
        loop {
            let e = event(&mut c, id);
            got.extend_from_slice(&e.data);
            granted += e.grant;
            if e.closed {
                assert_eq!(e.error, "");
                break;
            }
        }
        assert_eq!(got, b"HELLO PORT");
        assert_eq!(granted, 10, "every byte written to the server is granted back");
    }

    #[test]
    fn nothing_listening_is_not_found() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
        match c.call(Req::PortOpen(PortOpenRequest { port: port as u32, window: 4096 })) {
            Resp::Error(e) => {
                assert_eq!(e.kind, Kind::NotFound as i32);
                assert!(e.message.contains("nothing listens"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        match c.call(Req::PortOpen(PortOpenRequest { port: 70000, window: 4096 })) {
            Resp::Error(e) => assert_eq!(e.kind, Kind::Invalid as i32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_agent_sends_no_more_than_its_credit() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(&vec![7u8; 1 << 20]);
        });
        let mut c = Client::start(Runtime::new("", vec![], "/nonexistent"));
        let window = 8 * 1024;
        let id = open(&mut c, port, window);
        let mut charged = 0u32;
        c.sock.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        // Without grants the agent stops at the window.
        loop {
            let mut buf = [0u8; 65536];
            if let Some(r) = c.dec.next_message::<Response>().unwrap() {
                if let Some(Resp::PortEvent(e)) = r.body {
                    charged += forkd_agent_protocol::port_charge(e.data.len());
                }
                continue;
            }
            match c.sock.read(&mut buf) {
                Ok(n) if n > 0 => c.dec.push(&buf[..n]),
                _ => break,
            }
        }
        assert!(charged > 0 && charged <= window, "charged {charged} of a {window}-byte window");
        // A grant lets more through.
        c.sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.send(Req::PortSend(PortSendRequest { target_id: id, grant: window, ..Default::default() }));
        let e = event(&mut c, id);
        assert!(!e.data.is_empty());
        c.send(Req::Cancel(CancelRequest { target_id: id }));
    }
}
