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

    match c.call(Req::Eval(EvalRequest { code: "1".into(), timeout_ms: 0 })) {
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
    let eval = |c: &mut Client, code: &str, timeout_ms| match c
        .call(Req::Eval(EvalRequest { code: code.into(), timeout_ms }))
    {
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
