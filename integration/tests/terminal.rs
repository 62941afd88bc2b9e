//! The CLI's terminal and process verbs against a real daemon and a real
//! VM: `forkd exec -it` driven through tmux the way a person types into it
//! (keys, Ctrl-C, a window resize, `exit 5`), piped `exec -i`, and the
//! background-process verbs `exec -d`, `ps`, `attach`, `signal` and `watch`.
//!
//! tmux is part of the host setup (scripts/setup-host.sh); without it the
//! terminal test fails rather than skips.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cli_output, fork, post_ok, serial, wait_ready};
use forkd_integration::{Daemon, Options, cli_bin};
use serde_json::{Value, json};

/// Longest wait for anything the guest does (it runs under TCG here).
const DEADLINE: Duration = Duration::from_secs(60);
/// Between two looks at a screen or a file.
const POLL: Duration = Duration::from_millis(100);

/// A daemon with one sandbox forked from a busybox snapshot.
async fn sandbox() -> (Daemon, String) {
    let d = Daemon::start(Options::default());
    post_ok(&d, "/v1/snapshots", json!({ "tag": "term", "image": "minimal" })).await;
    wait_ready(&d, "term").await;
    let id = fork(&d, "term", 1).await.remove(0);
    (d, id)
}

/// The CLI's arguments that point it at `d` (the token by file, so a shell
/// script can hold them without quoting a secret).
fn cli_prefix(d: &Daemon) -> Vec<String> {
    let mut args = vec![cli_bin().display().to_string(), "--url".into(), d.http_url()];
    if d.token.is_some() {
        args.extend(["--token-file".into(), d.data_dir.join("token").display().to_string()]);
    }
    args
}

/// Polls `look` until it gives a value; panics after `DEADLINE` with `what`
/// and the last thing seen.
fn poll<T>(what: &str, mut look: impl FnMut() -> (Option<T>, String)) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (found, seen) = look();
        if let Some(v) = found {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last seen:\n{seen}");
        std::thread::sleep(POLL);
    }
}

/// A tmux server of our own (its own socket and no user config) holding one
/// session; killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, cols: u32, rows: u32, command: &str) -> Self {
        let t = Tmux { socket: dir.join("tmux.sock") };
        let (cols, rows) = (cols.to_string(), rows.to_string());
        t.ok(&["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", &cols, "-y", &rows, command]);
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        // A private server even when the test itself runs inside tmux.
        Command::new("tmux").env_remove("TMUX").arg("-S").arg(&self.socket).args(args).output().expect("run tmux")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, text: &str) {
        self.ok(&["send-keys", "-t", "t", "-l", text]);
        self.ok(&["send-keys", "-t", "t", "Enter"]);
    }

    /// Presses one key (`C-c`, `Enter`).
    fn key(&self, key: &str) {
        self.ok(&["send-keys", "-t", "t", key]);
    }

    /// Everything the pane showed, history included, wrapped lines joined.
    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-J", "-S", "-", "-t", "t"])
    }

    /// (rows, cols) of the pane.
    fn pane_size(&self) -> (u32, u32) {
        let text = self.ok(&["display-message", "-p", "-t", "t", "#{pane_height} #{pane_width}"]);
        parse_size(&text).unwrap_or_else(|| panic!("pane size {text:?}"))
    }

    /// Waits for a screen line that `find` recognises.
    fn wait_line<T>(&self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        poll(what, || {
            let screen = self.screen();
            (screen.lines().find_map(|l| find(l.trim_end())), screen)
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// `30 100` → (30, 100).
fn parse_size(text: &str) -> Option<(u32, u32)> {
    let mut it = text.split_whitespace().map(|n| n.parse::<u32>().ok());
    match (it.next(), it.next(), it.next()) {
        (Some(Some(r)), Some(Some(c)), None) => Some((r, c)),
        _ => None,
    }
}

/// Whether a `sleep` runs in the sandbox, asked through the CLI.
fn sleep_runs(d: &Daemon, id: &str) -> bool {
    let (code, _, err) = cli_output(d, &["exec", id, "--", "pidof", "sleep"]);
    assert!(code == 0 || code == 1, "pidof: {code} {err}");
    code == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_in_tmux() {
    let tmux_version = Command::new("tmux").arg("-V").output();
    assert!(
        tmux_version.as_ref().is_ok_and(|o| o.status.success()),
        "tmux is missing ({tmux_version:?}): scripts/setup-host.sh installs it"
    );
    let _serial = serial().await;
    let (d, id) = sandbox().await;

    // Without a terminal on stdin, -it is refused (exit 2) before anything runs.
    let (code, _, err) = cli_output(&d, &["exec", "-it", &id, "--", "sh"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs stdin to be a terminal"), "{err}");

    // The pane runs forkd, then records its exit status and whether the
    // pane's terminal settings came back as they were.
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status");
    let script = dir.path().join("session.sh");
    let forkd: Vec<String> = cli_prefix(&d).iter().map(|a| format!("'{a}'")).collect();
    let text = format!(
        "before=$(stty -g)\n\
         {} exec -it {id} -- sh\n\
         code=$?\n\
         [ \"$(stty -g)\" = \"$before\" ] && restored=restored || restored=changed\n\
         echo \"$code $restored\" > {s}.tmp && mv {s}.tmp {s}\n",
        forkd.join(" "),
        s = status.display()
    );
    std::fs::write(&script, text).unwrap();
    let tmux = Tmux::start(dir.path(), 100, 30, &format!("sh {}", script.display()));

    // A prompt, then a typed command runs (the marker is computed by the
    // guest's shell, so the echo of the typed line cannot match it).
    tmux.wait_line("the shell's prompt", |l| (l.ends_with('#') || l.ends_with("# ")).then_some(()));
    tmux.type_line("echo M$((6*7))");
    tmux.wait_line("the typed command's output", |l| (l == "M42").then_some(()));

    // The guest's terminal has the pane's size, and follows it.
    let check_size = |n: u32| {
        let want = tmux.pane_size();
        let marker = format!("S{n}=");
        poll(&format!("stty size = {want:?}"), || {
            tmux.type_line(&format!("echo {marker}$(stty size)"));
            std::thread::sleep(Duration::from_millis(500));
            let screen = tmux.screen();
            let seen: Vec<(u32, u32)> =
                screen.lines().filter_map(|l| l.trim_end().strip_prefix(&marker).and_then(parse_size)).collect();
            (seen.contains(&want).then_some(want), screen)
        })
    };
    let first = check_size(1);
    tmux.ok(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    let second = check_size(2);
    assert_ne!(first, second, "the pane was resized");
    assert_eq!(second.1, 120);

    // Ctrl-C reaches the guest's line discipline: it stops the foreground
    // `sleep 100`, and the shell it ran under still answers.
    tmux.type_line("sleep 100");
    poll("sleep 100 to start in the guest", || (sleep_runs(&d, &id).then_some(()), tmux.screen()));
    tmux.key("C-c");
    // (Well before the 100 s are up: `poll` gives up after DEADLINE.)
    poll("Ctrl-C to stop the sleep", || ((!sleep_runs(&d, &id)).then_some(()), tmux.screen()));
    tmux.type_line("echo A$((1+1))");
    tmux.wait_line("the shell to answer after Ctrl-C", |l| (l == "A2").then_some(()));

    // `exit 5` ends the session: forkd exits 5 and leaves the terminal as
    // it found it.
    tmux.type_line("exit 5");
    let result = poll("forkd to exit", || match std::fs::read_to_string(&status) {
        Ok(s) => (Some(s.trim().to_string()), s),
        Err(e) => (None, format!("{e}; screen:\n{}", tmux.screen())),
    });
    assert_eq!(result, "5 restored");
    drop(tmux);

    // Piped input without a terminal: -i streams it, stdout and stderr stay
    // apart, and the command's status comes back.
    let mut child = d
        .cli()
        .args(["exec", "-i", &id, "--", "sh", "-c", "cat; echo oops >&2; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"line one\nline two\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line one\nline two\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
}

/// A CLI process whose output lines arrive on channels; killed when dropped.
struct Running {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

impl Running {
    fn start(d: &Daemon, args: &[&str]) -> Self {
        let mut child = d.cli().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let out = lines(Box::new(child.stdout.take().unwrap()));
        let err = lines(Box::new(child.stderr.take().unwrap()));
        Running { child, out, err }
    }

    /// The next line on `rx`; panics after `DEADLINE`.
    fn line(rx: &mpsc::Receiver<String>, what: &str) -> String {
        rx.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("no {what}: {e}"))
    }

    /// Lines on stdout until one satisfies `want` (returned with those before it).
    fn until(&self, what: &str, want: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = vec![];
        loop {
            let l =
                self.out.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("no line with {what} ({e}); saw {seen:?}"));
            let done = want(&l);
            seen.push(l);
            if done {
                return seen;
            }
        }
    }

    fn interrupt(&self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }

    /// The exit status, waiting at most `DEADLINE`.
    fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "forkd did not exit");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn numbers(lines: &[String]) -> Vec<u64> {
    lines.iter().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("not a count: {l:?} in {lines:?}"))).collect()
}

const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.2; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes_and_file_watch() {
    let _serial = serial().await;
    let (d, id) = sandbox().await;

    // Started in the background: the handle is printed at once.
    let (code, out, err) = cli_output(&d, &["exec", "-d", "--tag", "counter", &id, "--", "sh", "-c", COUNTER]);
    assert_eq!(code, 0, "{err}");
    let pid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("pid").map(|p| p.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    assert!(out.lines().any(|l| l.split_whitespace().eq(["tag", "counter"])), "{out}");
    let (code, out, err) = cli_output(&d, &["--json", "exec", "-d", &id, "--", "sleep", "600"]);
    assert_eq!(code, 0, "{err}");
    let sleeper: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sleeper["running"], true, "{sleeper}");
    assert_eq!(sleeper["args"], json!(["sleep", "600"]));

    // ps lists both.
    let (code, out, err) = cli_output(&d, &["ps", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("PID  "), "{out}");
    let row = out.lines().find(|l| l.contains("counter")).unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], &[pid.to_string().as_str(), "counter", "running"], "{out}");
    assert!(out.contains("sleep 600"), "{out}");
    let (_, out, _) = cli_output(&d, &["ps", &id, "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    let counter = listed.as_array().unwrap().iter().find(|p| p["tag"] == "counter").unwrap();
    assert_eq!(counter["pid"], pid);
    assert_eq!(counter["running"], true);

    // attach replays from the first line and follows; Ctrl-C detaches and
    // leaves the process running.
    let mut attach = Running::start(&d, &["attach", &id, "counter"]);
    let seen = attach.until("the fifth count", |l| l.trim() == "4");
    assert_eq!(numbers(&seen), vec![0, 1, 2, 3, 4]);
    attach.interrupt();
    assert_eq!(attach.wait(), 130);
    assert!(Running::line(&attach.err, "detach notice").contains("detached"));
    let (_, out, _) = cli_output(&d, &["ps", &id]);
    assert!(out.lines().any(|l| l.contains("counter") && l.contains("running")), "{out}");

    // --no-replay starts at the current end: later counts only, in order.
    let mut tail = Running::start(&d, &["attach", &id, &pid.to_string(), "--no-replay"]);
    let first = numbers(&[Running::line(&tail.out, "a new count")])[0];
    assert!(first > 4, "--no-replay began at {first}");
    let next = numbers(&[Running::line(&tail.out, "the count after")])[0];
    assert_eq!(next, first + 1);
    tail.interrupt();
    assert_eq!(tail.wait(), 130);

    // signal ends it; an attach now replays and exits with its status.
    let (code, out, err) = cli_output(&d, &["signal", &id, "counter", "TERM"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("process {pid}")), "{out}");
    let mut last = Running::start(&d, &["attach", &id, "counter"]);
    assert_eq!(last.wait(), 128 + 15);
    let (_, out, _) = cli_output(&d, &["ps", &id]);
    assert!(out.lines().any(|l| l.contains("counter") && l.contains("killed by TERM")), "{out}");
    assert_eq!(cli_output(&d, &["signal", &id, "nosuch", "TERM"]).0, 3);

    // watch prints a line per change under the directory, below it too.
    let (code, _, err) = cli_output(&d, &["exec", &id, "--", "mkdir", "-p", "/tmp/w"]);
    assert_eq!(code, 0, "{err}");
    let mut watch = Running::start(&d, &["watch", &id, "/tmp/w"]);
    assert!(Running::line(&watch.err, "the armed notice").contains("watching /tmp/w"));
    let (code, _, err) = cli_output(&d, &["exec", &id, "--", "sh", "-c", "touch /tmp/w/a && mkdir /tmp/w/d"]);
    assert_eq!(code, 0, "{err}");
    let seen = watch.until("the directory's creation", |l| l == "create /tmp/w/d/");
    assert!(seen.contains(&"create /tmp/w/a".to_string()), "{seen:?}");
    let (code, _, err) = cli_output(&d, &["exec", &id, "--", "sh", "-c", "touch /tmp/w/d/b && rm /tmp/w/a"]);
    assert_eq!(code, 0, "{err}");
    let seen = watch.until("the removal", |l| l == "remove /tmp/w/a");
    assert!(seen.contains(&"create /tmp/w/d/b".to_string()), "recursive: {seen:?}");
    watch.interrupt();
    watch.wait();

    // --json --no-recursive: NDJSON, and nothing from below the directory.
    let json_watch = Running::start(&d, &["watch", &id, "/tmp/w", "--json", "--no-recursive"]);
    assert!(Running::line(&json_watch.err, "the armed notice").contains("watching"));
    let (code, _, err) = cli_output(&d, &["exec", &id, "--", "sh", "-c", "touch /tmp/w/d/c && touch /tmp/w/e"]);
    assert_eq!(code, 0, "{err}");
    let seen = json_watch.until("the top-level file", |l| l.contains("/tmp/w/e"));
    let events: Vec<Value> = seen.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        events.iter().any(|e| e["kind"] == "CREATE" && e["path"] == "/tmp/w/e" && e["is_dir"] == false),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["path"] != "/tmp/w/d/c"), "not recursive: {events:?}");
}
