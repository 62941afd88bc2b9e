//! The warm language runtime: a long-lived `python3` running runtime.py,
//! driven with JSON lines over two pipes (fd 3: requests, fd 4: replies), so
//! whatever user code prints on stdout/stderr can never corrupt the protocol.
//!
//! Timeouts are enforced in the interpreter (SIGALRM raises inside the
//! evaluated code). If it does not answer within a grace period after that —
//! stuck in C code that never returns to the interpreter — the agent kills it
//! and starts a fresh one: the namespace is lost and the eval reports 124.

use crate::exec::{DEFAULT_PATH, HOME, base_env, env_vec};
use crate::proc::{self, Child, Spec};
use crate::{log, sys};
use forkd_agent_protocol::v1::{EvalRequest, EvalResult, RichResult};
use serde_json::{Value, json};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SCRIPT: &str = include_str!("../../runtime/runtime.py");
/// Extra time the interpreter gets to report its own timeout before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// Warm imports under TCG can take many seconds; give up only when clearly stuck.
const WARM_LIMIT: Duration = Duration::from_secs(600);

pub struct Runtime {
    kind: String,
    warm: Vec<String>,
    script_dir: String,
    ready: AtomicBool,
    pid: AtomicI32,
    seq: AtomicU64,
    inner: Mutex<Option<Proc>>,
    /// A reseed the interpreter has not applied yet. Applied before the next
    /// evaluation, so no user code ever sees the old generator state, while
    /// a restore does not wait for Python (slow on a cold emulated CPU).
    pending_seed: Mutex<Option<Vec<u8>>>,
}

struct Proc {
    child: Child,
    to: OwnedFd,
    from: LineReader,
}

/// Reads newline-terminated lines from a pipe with a deadline.
struct LineReader {
    fd: OwnedFd,
    buf: Vec<u8>,
}

enum LineError {
    Timeout,
    Closed,
}

impl LineReader {
    fn read_line(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, LineError> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return Ok(line);
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(LineError::Timeout);
                    }
                    Some(left)
                }
                None => None,
            };
            let rev = sys::poll_one(self.fd.as_raw_fd(), libc::POLLIN, wait).map_err(|_| LineError::Closed)?;
            if rev == 0 {
                continue;
            }
            match sys::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => return Err(LineError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(_) => return Err(LineError::Closed),
            }
        }
    }
}

/// The rich results of a reply: string representations only, the rest
/// dropped.
fn rich_results(v: &Value) -> Vec<RichResult> {
    let Some(list) = v.get("results").and_then(Value::as_array) else { return vec![] };
    list.iter()
        .map(|r| RichResult {
            data: r
                .get("data")
                .and_then(Value::as_object)
                .map(|d| d.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default(),
            main: r.get("main").and_then(Value::as_bool).unwrap_or(false),
        })
        .collect()
}

fn eval_error(exit_code: i32, msg: impl Into<String>) -> EvalResult {
    EvalResult { error: msg.into(), exit_code, ..Default::default() }
}

impl Runtime {
    /// `kind` is "python" or "" (no runtime). `script_dir` receives runtime.py.
    pub fn new(kind: &str, warm: Vec<String>, script_dir: &str) -> Arc<Runtime> {
        Arc::new(Runtime {
            kind: kind.to_string(),
            warm,
            script_dir: script_dir.to_string(),
            ready: AtomicBool::new(false),
            pid: AtomicI32::new(0),
            seq: AtomicU64::new(0),
            inner: Mutex::new(None),
            pending_seed: Mutex::new(None),
        })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Starts (or restarts) the interpreter on a background thread.
    pub fn start_background(self: &Arc<Self>) {
        if self.kind.is_empty() {
            return;
        }
        let me = self.clone();
        let r = std::thread::Builder::new().name("runtime-start".into()).stack_size(256 * 1024).spawn(move || {
            if let Ok(mut g) = me.inner.lock()
                && g.is_none()
            {
                *g = me.start();
            }
        });
        if let Err(e) = r {
            log::error(&format!("cannot start the runtime thread: {e}"));
        }
    }

    /// Spawns the interpreter and waits for its warm-up to finish.
    fn start(&self) -> Option<Proc> {
        if self.kind != "python" {
            log::error(&format!("unknown runtime {:?}", self.kind));
            return None;
        }
        let t0 = Instant::now();
        let python = match proc::resolve_program("python3", DEFAULT_PATH) {
            Some(p) => p,
            None => {
                log::error("runtime python: python3 not found in the image");
                return None;
            }
        };
        let script = format!("{}/runtime.py", self.script_dir);
        let written = sys::mkdir_p(&self.script_dir, 0o755).and_then(|_| std::fs::write(&script, SCRIPT));
        if let Err(e) = written {
            log::error(&format!("runtime python: writing {script}: {e}"));
            return None;
        }
        let result = (|| -> std::io::Result<Proc> {
            let (req_r, req_w) = sys::pipe()?;
            let (resp_r, resp_w) = sys::pipe()?;
            let null = sys::open("/dev/null", libc::O_RDWR, 0)?;
            let mut env = base_env();
            env.insert("FORKD_WARM".into(), self.warm.join(","));
            env.insert("PYTHONUNBUFFERED".into(), "1".into());
            let cwd = if std::path::Path::new(HOME).is_dir() { HOME } else { "/" };
            let spec = Spec {
                program: sys::cstr(&python)?,
                argv: ["python3", "-u", "-B", &script, "3", "4"].iter().map(sys::cstr).collect::<Result<_, _>>()?,
                envp: env_vec(&env)?,
                cwd: Some(sys::cstr(cwd)?),
                fds: vec![
                    (null.as_raw_fd(), 0),
                    (null.as_raw_fd(), 1),
                    (null.as_raw_fd(), 2),
                    (req_r.as_raw_fd(), 3),
                    (resp_w.as_raw_fd(), 4),
                ],
                new_group: true,
                session_on_tty: false,
                ids: None,
            };
            let child = proc::spawn(&spec, None)?;
            Ok(Proc { child, to: req_w, from: LineReader { fd: resp_r, buf: Vec::new() } })
        })();
        let mut p = match result {
            Ok(p) => p,
            Err(e) => {
                log::error(&format!("runtime python: spawn failed: {e}"));
                return None;
            }
        };
        match p.from.read_line(Some(Instant::now() + WARM_LIMIT)) {
            Ok(line) => {
                let v: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                if let Some(err) = v.get("warm_error").and_then(Value::as_str).filter(|s| !s.is_empty()) {
                    log::error(&format!("runtime python: warm import failed: {err}"));
                }
                log::info(&format!(
                    "runtime python ready in {} ms (warm: {})",
                    t0.elapsed().as_millis(),
                    self.warm.join(",")
                ));
                self.pid.store(p.child.pid, Ordering::SeqCst);
                self.ready.store(true, Ordering::SeqCst);
                Some(p)
            }
            Err(_) => {
                log::error("runtime python: exited or hung during warm-up");
                kill(&p.child);
                None
            }
        }
    }

    /// Sends one request line and reads the reply, under the caller's lock.
    fn call(&self, p: &mut Proc, msg: &Value, deadline: Option<Instant>) -> Result<Value, LineError> {
        self.call_streamed(p, msg, deadline, &mut |_, _| {})
    }

    /// As `call`, handing the output lines a streamed eval sends before its
    /// reply to `output` (stream name, text).
    fn call_streamed(
        &self,
        p: &mut Proc,
        msg: &Value,
        deadline: Option<Instant>,
        output: &mut dyn FnMut(&str, &str),
    ) -> Result<Value, LineError> {
        let mut line = msg.to_string();
        line.push('\n');
        if sys::write_all(p.to.as_raw_fd(), line.as_bytes(), deadline).is_err() {
            return Err(LineError::Closed);
        }
        loop {
            let reply = p.from.read_line(deadline)?;
            let v: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
            match (v.get("out").and_then(Value::as_str), v.get("text").and_then(Value::as_str)) {
                (Some(stream), Some(text)) => output(stream, text),
                _ => return Ok(v),
            }
        }
    }

    /// Drops a broken interpreter and starts a new one in the background.
    fn discard(self: &Arc<Self>, slot: &mut Option<Proc>) {
        self.ready.store(false, Ordering::SeqCst);
        self.pid.store(0, Ordering::SeqCst);
        if let Some(p) = slot.take() {
            kill(&p.child);
        }
        self.start_background();
    }

    /// Evaluates `req`; with `req.stream`, printed output goes to `output`
    /// (stream name, text) while the code runs.
    pub fn eval_streamed(self: &Arc<Self>, req: &EvalRequest, output: &mut dyn FnMut(&str, &str)) -> EvalResult {
        let timeout_ms = req.timeout_ms;
        if self.kind.is_empty() {
            return eval_error(2, "this image has no warm runtime");
        }
        let Ok(mut g) = self.inner.lock() else { return eval_error(2, "runtime lock poisoned") };
        if g.is_none() {
            *g = self.start();
        }
        let Some(p) = g.as_mut() else { return eval_error(2, "the python runtime is not available") };
        let pending = self.pending_seed.lock().ok().and_then(|mut s| s.take());
        if let Some(seed) = pending
            && !self.send_reseed(p, &seed)
        {
            self.discard(&mut g);
            return eval_error(1, "the python runtime could not be reseeded; it was restarted and its state lost");
        }
        let Some(p) = g.as_mut() else { return eval_error(2, "the python runtime is not available") };
        let id = self.seq.fetch_add(1, Ordering::SeqCst);
        let timeout = Duration::from_millis(timeout_ms as u64);
        let msg = json!({
            "op": "eval",
            "id": id,
            "code": req.code,
            "timeout": timeout.as_secs_f64(),
            "context": req.context,
            "rich": req.rich,
            "env": req.env,
            "cwd": req.cwd,
            "drop_context": req.drop_context,
            "stream": req.stream,
        });
        let deadline = (timeout_ms > 0).then(|| Instant::now() + timeout + KILL_GRACE);
        match self.call_streamed(p, &msg, deadline, output) {
            Ok(v) => EvalResult {
                result: str_field(&v, "result"),
                error: str_field(&v, "error"),
                exit_code: v.get("exit_code").and_then(Value::as_i64).unwrap_or(1) as i32,
                stdout: str_field(&v, "stdout"),
                stderr: str_field(&v, "stderr"),
                error_name: str_field(&v, "error_name"),
                error_value: str_field(&v, "error_value"),
                results: rich_results(&v),
            },
            Err(LineError::Timeout) => {
                self.discard(&mut g);
                eval_error(
                    124,
                    format!("timed out after {timeout_ms} ms; the interpreter was restarted and its state lost"),
                )
            }
            Err(LineError::Closed) => {
                self.discard(&mut g);
                eval_error(1, "the python runtime exited; it was restarted and its state lost")
            }
        }
    }

    /// Pid of the interpreter (0 when none runs).
    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Interrupts the running eval (KeyboardInterrupt inside the code).
    pub fn interrupt(&self) {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 {
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    }

    /// Reseeds the interpreter's generators with `seed`. False when there is
    /// no ready runtime or it did not confirm.
    /// Schedules a reseed of the interpreter's generators (`random`, numpy's
    /// global one); it runs before the next evaluation. False when there is
    /// no ready runtime.
    pub fn reseed(self: &Arc<Self>, seed: &[u8]) -> bool {
        if !self.ready() {
            return false;
        }
        match self.pending_seed.lock() {
            Ok(mut s) => {
                *s = Some(seed.to_vec());
                true
            }
            Err(_) => false,
        }
    }

    fn send_reseed(&self, p: &mut Proc, seed: &[u8]) -> bool {
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let msg = json!({"op": "reseed", "seed": hex});
        match self.call(p, &msg, Some(Instant::now() + Duration::from_secs(30))) {
            Ok(v) => v.get("ok").and_then(Value::as_bool).unwrap_or(false),
            Err(_) => false,
        }
    }
}

fn str_field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn kill(child: &Child) {
    unsafe { libc::kill(-child.pid, libc::SIGKILL) };
    unsafe { libc::kill(child.pid, libc::SIGKILL) };
    let _ = child.exit.wait(Some(Duration::from_secs(5)));
}
